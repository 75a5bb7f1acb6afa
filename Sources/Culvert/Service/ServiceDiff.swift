/// How a reloaded set of services differs from the running one, by each service's stable
/// key: what to start, what to drain, what to replace. Services equal in both are not
/// listed, so a reload never touches them or their connections.
struct ServiceDiff<Key: Hashable & Comparable, Service: Equatable> {
    /// In the new set only, in key order.
    let added: [(key: Key, service: Service)]
    /// In the running set only, in key order.
    let removed: [(key: Key, service: Service)]
    /// In both, but different: the running one and its successor, in key order.
    let changed: [(key: Key, old: Service, new: Service)]

    init(running: [Key: Service], new: [Key: Service]) {
        added = new.filter { running[$0.key] == nil }.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        removed = running.filter { new[$0.key] == nil }.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        changed = new.compactMap { key, service in
            guard let old = running[key], old != service else { return nil }
            return (key, old, service)
        }.sorted { $0.key < $1.key }
    }

    var isEmpty: Bool { added.isEmpty && removed.isEmpty && changed.isEmpty }
}
