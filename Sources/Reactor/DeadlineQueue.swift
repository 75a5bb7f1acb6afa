/// A handle on a timer in a `DeadlineQueue`, for `EventLoop.cancel(_:)`.
public struct QueuedTimer: Sendable {
    let queue: Int
    let sequence: UInt64
}

/// Timers that all wait the same delay (every connect timeout of a loop's dials), kept in
/// the order they were started, which is also the order they fall due. Adding appends at
/// the tail and cancelling clears the entry's action, both O(1) with no heap sift and no
/// allocation; one heap timer, armed for the earliest entry, stands for the whole queue.
///
/// The head timer is left armed when the entries it stood for are cancelled: the next
/// entry falls due later, so the armed timer still fires in time, and a loop that
/// starts and cancels a timer per connection then touches the heap once per delay, not
/// twice per connection.
///
/// Thread confinement: owned by one event loop and touched on its thread only.
final class DeadlineQueue {
    private struct Entry {
        let deadline: UInt64
        var action: (() -> Void)?
    }

    let delay: Duration
    private let delayNanos: UInt64
    private let index: Int
    private unowned let heap: TimerHeap
    private var entries: [Entry] = []
    /// Entries before `head` have fired or were cancelled; they are dropped in bulk.
    private var head = 0
    /// The sequence number of `entries[0]`.
    private var firstSequence: UInt64 = 0
    private var headTimer: LoopTimer?
    /// Entries still waiting, for leak checks.
    private(set) var waiting = 0

    init(delay: Duration, index: Int, heap: TimerHeap) {
        self.delay = delay
        delayNanos = delay.nanoseconds
        self.index = index
        self.heap = heap
    }

    /// Whether the heap holds this queue's head timer (counted apart from user timers).
    var isArmed: Bool { headTimer?.isPending ?? false }

    func add(now: UInt64, _ action: @escaping () -> Void) -> QueuedTimer {
        let deadline = now &+ delayNanos
        entries.append(Entry(deadline: deadline, action: action))
        waiting += 1
        if !isArmed { arm(at: deadline) }
        return QueuedTimer(queue: index, sequence: firstSequence &+ UInt64(entries.count - 1))
    }

    func cancel(_ timer: QueuedTimer) {
        let i = Int(truncatingIfNeeded: timer.sequence &- firstSequence)
        guard timer.sequence >= firstSequence, i >= head, i < entries.count, entries[i].action != nil else { return }
        entries[i].action = nil
        waiting -= 1
        dropCancelledHead()
    }

    /// Runs the entries due at `now`, in order, then arms the head timer for the next.
    private func fire(now: UInt64) {
        while head < entries.count && entries[head].deadline <= now {
            let action = entries[head].action
            entries[head].action = nil
            head += 1
            if action != nil { waiting -= 1 }
            // An action may add to or cancel from this queue: the entry is out first.
            action?()
        }
        dropCancelledHead()
        if head < entries.count && !isArmed { arm(at: entries[head].deadline) }
    }

    private func arm(at deadline: UInt64) {
        let timer = LoopTimer(deadline: deadline) { [unowned self] in fire(now: deadline) }
        headTimer = timer
        heap.insert(timer)
    }

    /// Drops cancelled entries at the front, so a queue whose timers are cancelled in
    /// about the order they were added (connects answer in about the same time) stays
    /// short; the array is compacted in bulk, not per entry.
    private func dropCancelledHead() {
        while head < entries.count && entries[head].action == nil { head += 1 }
        if head >= 1024 && head * 2 >= entries.count {
            firstSequence &+= UInt64(head)
            entries.removeFirst(head)
            head = 0
        }
    }
}
