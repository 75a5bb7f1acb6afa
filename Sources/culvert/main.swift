#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser

// Exit status: 0 ok (also --help), 1 runtime failure, 2 usage error. ArgumentParser's
// own code for validation errors (64) is folded into 2, which is what ssh-like tools use.
do {
    var command = try CulvertCommand.parseAsRoot()
    try command.run()
    exit(0)
} catch let code as ExitCode {
    exit(code.rawValue)
} catch {
    let status = CulvertCommand.exitCode(for: error)
    let message = CulvertCommand.fullMessage(for: error)
    if status == .success {
        print(message)
        exit(0)
    }
    FileHandleStderr.write(message)
    exit(2)
}
