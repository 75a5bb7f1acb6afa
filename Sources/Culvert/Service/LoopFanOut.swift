import Reactor

/// Runs `body` for each item on that item's loop (as a task on the loop's executor) and
/// returns the results, in no particular order: how a command that spans loops drains
/// or gathers counts without sharing state.
func onEachLoop<Item: Sendable, T: Sendable>(_ items: [Item], loop: (Item) -> EventLoop,
                                             _ body: @escaping @Sendable (Item) async -> T) async -> [T] {
    await withTaskGroup(of: T.self) { group in
        for item in items {
            group.addTask(executorPreference: loop(item).tasks) { await body(item) }
        }
        var results: [T] = []
        for await r in group { results.append(r) }
        return results
    }
}
