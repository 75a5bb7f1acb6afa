// swift-tools-version:6.0
import PackageDescription

// The data plane is written so that no two accesses to a stored property overlap (debug
// builds and the tests keep Swift's runtime exclusivity checks on); release builds drop
// the checks, which cost about a quarter of the instructions per forwarded connection
// (bench/NOTES.md).
let dataPlaneSettings: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

let package = Package(
    name: "culvert",
    products: [
        .executable(name: "culvert", targets: ["culvert"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
    ],
    targets: [
        .target(name: "CCulvert"),
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        .systemLibrary(
            name: "CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        .target(name: "CCulvertTLS", dependencies: ["COpenSSL"]),
        .target(name: "Reactor", dependencies: ["CCulvert"], swiftSettings: dataPlaneSettings),
        .target(
            name: "Transfer",
            dependencies: ["CCulvert", "CCulvertTLS", "Reactor", "COpenSSL", "CZlib"],
            swiftSettings: dataPlaneSettings
        ),
        .target(
            name: "Culvert",
            dependencies: [
                "Reactor", "Transfer", "COpenSSL", "CCulvertTLS",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "TOMLKit", package: "TOMLKit"),
            ],
            swiftSettings: dataPlaneSettings
        ),
        .executableTarget(
            name: "culvert",
            dependencies: [
                "Culvert", "Reactor",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "ReactorTests", dependencies: ["Reactor", "CCulvert"]),
        .testTarget(name: "TransferTests", dependencies: ["Transfer", "Reactor", "CCulvert"]),
        .testTarget(name: "CulvertTests", dependencies: ["Culvert", "Transfer", "Reactor"]),
    ],
    swiftLanguageModes: [.v5]
)
