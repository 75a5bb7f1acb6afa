#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser

// Exit status: 0 ok (also --help), 1 runtime failure, 2 usage error. ArgumentParser's
// own code for validation errors (64) is folded into 2, which is what ssh-like tools use.
let arguments = CommandLineUsage.attachingNegativeValues(Array(CommandLine.arguments.dropFirst()))
var command: ParsableCommand
do {
    try CommandLineUsage.checkHelpTopic(arguments)
    command = try CulvertCommand.parseAsRoot(arguments)
} catch {
    CommandLineUsage.exit(for: error, in: nil)
}
do {
    try command.run()
    exit(0)
} catch {
    CommandLineUsage.exit(for: error, in: type(of: command))
}
