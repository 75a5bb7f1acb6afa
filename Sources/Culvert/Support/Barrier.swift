/// Counts arrivals on the main loop and runs `onComplete` once all have arrived.
final class Barrier: @unchecked Sendable {
    private var remaining: Int
    private let onComplete: () -> Void

    init(count: Int, onComplete: @escaping () -> Void) {
        remaining = count
        self.onComplete = onComplete
    }

    func arrive() {
        remaining -= 1
        if remaining == 0 { onComplete() }
    }
}
