#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser

/// What the entry point adds to ArgumentParser so that every usage error exits 2 and
/// shows the usage of the command at hand.
enum CommandLineUsage {
    /// Thrown by a command that only groups others (`culvert`, `culvert forward`) when it
    /// is run without one: its help goes to stderr as a usage error, not to stdout as
    /// asked-for help, so a script that forgot the subcommand fails.
    struct MissingSubcommand: Error {
        let group: ParsableCommand.Type
    }

    /// `--opt -5` as `--opt=-5`. ArgumentParser takes a word that starts with `-` for a
    /// short option and reports the value of `--opt` as missing; attached, the value
    /// reaches the option's own parser, which says why -5 is not valid. Positional
    /// arguments and the words after `--` are left alone.
    static func attachingNegativeValues(_ arguments: [String]) -> [String] {
        var out: [String] = []
        for word in arguments {
            if let last = out.last, last.hasPrefix("--"), last.count > 2, !last.contains("="), !out.contains("--"),
               word.count > 1, word.hasPrefix("-"), word.dropFirst().first.map({ $0.isNumber || $0 == "." }) == true {
                out[out.count - 1] = last + "=" + word
            } else {
                out.append(word)
            }
        }
        return out
    }

    /// `culvert help NAME...` must name commands: ArgumentParser ignores names it does
    /// not know and prints the top-level help with status 0.
    static func checkHelpTopic(_ arguments: [String]) throws {
        guard arguments.first == "help" else { return }
        var group: ParsableCommand.Type = CulvertCommand.self
        var path = ["culvert"]
        for word in arguments.dropFirst() where !word.hasPrefix("-") {
            let children = group.configuration.subcommands
            guard let child = children.first(where: { name(of: $0) == word }) else {
                let known = children.map(name(of:)).joined(separator: ", ")
                throw ValidationError(known.isEmpty
                    ? "'\(path.joined(separator: " "))' has no subcommand '\(word)'"
                    : "no command '\(word)' in '\(path.joined(separator: " "))': give one of \(known)")
            }
            group = child
            path.append(word)
        }
    }

    /// Writes the message `error` calls for and exits with its status. `command` is the
    /// subcommand that ran and failed (nil: parsing failed, and ArgumentParser knows
    /// which command it was parsing).
    static func exit(for error: Error, in command: ParsableCommand.Type?) -> Never {
        switch error {
        case let code as ExitCode:
            Glibc.exit(code.rawValue)
        case let missing as MissingSubcommand:
            FileHandleStderr.write(CulvertCommand.helpMessage(for: missing.group))
            Glibc.exit(2)
        case let error as ValidationError:
            guard let command else { fallthrough }
            FileHandleStderr.write("Error: \(error.message)\n" + usage(of: command))
            Glibc.exit(2)
        default:
            if CulvertCommand.exitCode(for: error) == .success {
                print(CulvertCommand.fullMessage(for: error))
                Glibc.exit(0)
            }
            FileHandleStderr.write(CulvertCommand.fullMessage(for: error))
            Glibc.exit(2)
        }
    }

    /// The usage lines ArgumentParser prints after a parse error, for `command`.
    private static func usage(of command: ParsableCommand.Type) -> String {
        let names = path(to: command) ?? ["culvert"]
        return "Usage: \(CulvertCommand.usageString(for: command))\n"
            + "  See '\(names.joined(separator: " ")) --help' for more information."
    }

    private static func name(of command: ParsableCommand.Type) -> String {
        command.configuration.commandName ?? String(describing: command)
    }

    /// The command names from the root down to `target`.
    private static func path(to target: ParsableCommand.Type, from root: ParsableCommand.Type = CulvertCommand.self) -> [String]? {
        if root == target { return [name(of: root)] }
        for child in root.configuration.subcommands {
            if let rest = path(to: target, from: child) { return [name(of: root)] + rest }
        }
        return nil
    }
}
