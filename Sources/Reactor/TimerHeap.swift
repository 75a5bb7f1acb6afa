/// A one-shot timer owned by one event loop. Cancel it to release what its closure holds.
///
/// Thread confinement: created, fired and cancelled on its loop's thread only.
public final class LoopTimer {
    public internal(set) var deadline: UInt64
    fileprivate var sequence: UInt64 = 0
    fileprivate var heapIndex: Int = -1
    var action: (() -> Void)?
    weak var heap: TimerHeap?

    init(deadline: UInt64, action: @escaping () -> Void) {
        self.deadline = deadline
        self.action = action
    }

    /// Whether the timer is still waiting to fire.
    public var isPending: Bool { heapIndex >= 0 }

    /// Stops the timer; a no-op once it fired or was cancelled.
    public func cancel() {
        heap?.remove(self)
        action = nil
    }
}

/// Min-heap of timers ordered by (deadline, insertion order), so timers with the same
/// deadline fire in the order they were scheduled. Removal is O(log n) because each
/// timer knows its index: connect and idle timers are usually cancelled, not fired.
final class TimerHeap {
    private var items: [LoopTimer] = []
    private var nextSequence: UInt64 = 0

    var count: Int { items.count }
    var earliest: LoopTimer? { items.first }

    func insert(_ timer: LoopTimer) {
        precondition(timer.heapIndex < 0, "timer already scheduled")
        timer.sequence = nextSequence
        nextSequence &+= 1
        timer.heap = self
        timer.heapIndex = items.count
        items.append(timer)
        siftUp(items.count - 1)
    }

    func remove(_ timer: LoopTimer) {
        let i = timer.heapIndex
        guard i >= 0, i < items.count, items[i] === timer else { return }
        let last = items.count - 1
        if i != last {
            swapAt(i, last)
        }
        items.removeLast()
        timer.heapIndex = -1
        if i < items.count {
            siftDown(i)
            siftUp(i)
        }
    }

    /// Removes and returns the earliest timer if it is due at `now`.
    func popDue(now: UInt64) -> LoopTimer? {
        guard let first = items.first, first.deadline <= now else { return nil }
        remove(first)
        return first
    }

    private func less(_ a: LoopTimer, _ b: LoopTimer) -> Bool {
        a.deadline != b.deadline ? a.deadline < b.deadline : a.sequence < b.sequence
    }

    private func swapAt(_ i: Int, _ j: Int) {
        items.swapAt(i, j)
        items[i].heapIndex = i
        items[j].heapIndex = j
    }

    private func siftUp(_ start: Int) {
        var i = start
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(items[i], items[parent]) else { return }
            swapAt(i, parent)
            i = parent
        }
    }

    private func siftDown(_ start: Int) {
        var i = start
        while true {
            let l = 2 * i + 1
            let r = l + 1
            var smallest = i
            if l < items.count && less(items[l], items[smallest]) { smallest = l }
            if r < items.count && less(items[r], items[smallest]) { smallest = r }
            if smallest == i { return }
            swapAt(i, smallest)
            i = smallest
        }
    }
}
