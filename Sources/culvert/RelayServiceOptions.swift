import ArgumentParser

/// `--drain-timeout`, `--threads` and `--no-splice`: how a service that relays TCP
/// connections runs, meaning the same in `forward tcp` and `proxy`.
struct RelayServiceOptions: ParsableArguments {
    @Option(help: "On SIGINT/SIGTERM, time in-flight connections get to finish before they are reset (default: 30s).",
            transform: parseDuration)
    var drainTimeout: Duration?

    @Option(help: "Event loop threads (defaults to the number of cores).")
    var threads: Int?

    @Flag(help: "Copy through user-space buffers instead of splice(2).")
    var noSplice = false
}
