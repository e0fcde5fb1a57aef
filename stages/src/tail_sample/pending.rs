//! A pending trace in the sampler's index: when it is due, what the policies know of it so far,
//! and where its spans are in the `spans` edge.

use super::policies::Facts;

/// Consecutive spans of one batch: `count` spans from `index` on in batch `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) seq: u64,
    pub(super) index: u32,
    pub(super) count: u32,
}

/// A trace's spans as runs of consecutive spans in one batch. Exporters send a trace's spans
/// together, so most traces are one run, held inline: no allocation per trace.
#[derive(Debug)]
pub(super) struct SpanRuns {
    first: Run,
    /// Boxed: 8 bytes in every entry of the index instead of a vector's 24, for the few
    /// traces with more than one run.
    #[allow(clippy::box_collection)]
    rest: Option<Box<Vec<Run>>>,
}

impl SpanRuns {
    fn new(seq: u64, index: u32) -> SpanRuns {
        SpanRuns { first: Run { seq, index, count: 1 }, rest: None }
    }

    /// Adds span `index` of batch `seq` (extending the last run when it follows it).
    fn push(&mut self, seq: u64, index: u32) {
        let last = match &mut self.rest {
            Some(rest) => rest.last_mut().unwrap_or(&mut self.first),
            None => &mut self.first,
        };
        if last.seq == seq && last.index.checked_add(last.count) == Some(index) {
            last.count += 1;
            return;
        }
        self.rest.get_or_insert_with(Default::default).push(Run { seq, index, count: 1 });
    }

    /// The runs, in the order the spans arrived.
    pub(super) fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        std::iter::once(self.first).chain(self.rest.iter().flat_map(|rest| rest.iter().copied()))
    }

    /// The spans, in the order they arrived.
    pub(super) fn spans(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.runs().flat_map(|run| (run.index..run.index + run.count).map(move |index| (run.seq, index)))
    }

    /// Gives back spare capacity.
    pub(super) fn shrink_to_fit(&mut self) {
        if let Some(rest) = &mut self.rest {
            rest.shrink_to_fit();
        }
    }
}

/// A trace waiting for its decision.
#[derive(Debug)]
pub(super) struct PendingTrace {
    /// When this trace must be decided, Unix nanoseconds.
    pub(super) due_unix_nano: u64,
    /// Receive time of its first span, Unix nanoseconds.
    pub(super) first_received: u64,
    /// What the policies know of its spans so far.
    pub(super) facts: Facts,
    /// Its spans in the `spans` edge.
    pub(super) spans: SpanRuns,
    /// How many spans it has.
    pub(super) span_count: u32,
    /// Whether a span makes it worth keeping (an error or a slow span: what shedding decides
    /// early on).
    pub(super) interesting: bool,
}

impl PendingTrace {
    /// A trace whose first span is span `index` of batch `seq`.
    pub(super) fn new(due_unix_nano: u64, first_received: u64, seq: u64, index: u32) -> PendingTrace {
        PendingTrace {
            due_unix_nano,
            first_received,
            facts: Facts::default(),
            spans: SpanRuns::new(seq, index),
            span_count: 1,
            interesting: false,
        }
    }

    /// Adds a further span.
    pub(super) fn push(&mut self, seq: u64, index: u32) {
        self.spans.push(seq, index);
        self.span_count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_spans_of_a_batch_make_one_run_and_the_order_is_kept() {
        let mut trace = PendingTrace::new(0, 0, 7, 3);
        for index in 4..9 {
            trace.push(7, index);
        }
        assert_eq!(trace.spans.runs().count(), 1);
        assert!(trace.spans.rest.is_none(), "one run must not allocate");
        // A gap, another batch, then back to the first batch.
        trace.push(7, 12);
        trace.push(9, 0);
        trace.push(9, 1);
        trace.push(7, 13);
        let runs: Vec<Run> = trace.spans.runs().collect();
        assert_eq!(
            runs,
            vec![
                Run { seq: 7, index: 3, count: 6 },
                Run { seq: 7, index: 12, count: 1 },
                Run { seq: 9, index: 0, count: 2 },
                Run { seq: 7, index: 13, count: 1 },
            ]
        );
        let spans: Vec<(u64, u32)> = trace.spans.spans().collect();
        assert_eq!(spans.len() as u32, trace.span_count);
        assert_eq!(spans[..7], [(7, 3), (7, 4), (7, 5), (7, 6), (7, 7), (7, 8), (7, 12)]);
        assert_eq!(spans[7..], [(9, 0), (9, 1), (7, 13)]);
    }
}
