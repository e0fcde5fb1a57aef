//! What one tail_sample step writes: the kept spans (borrowed from the batches read in the
//! step's read transaction and encoded from there), the span metrics of the spans it ingested
//! and decided, and the decisions, committed together.

use tailgate_ipc::batch::{self, ArchivedSpanBatch, SubsetBuilder};
use tailgate_ipc::clock::pipeline_now;
use tailgate_ipc::decisions::Decision;

use super::policies;
use super::summaries::{self, Summaries};
use crate::context::StageError;
use crate::fast_map::FastMap;
use crate::limits::{MAX_DECISIONS_PER_STEP, MAX_OUTPUT_BATCH_BYTES};

/// The spans one step emits and the decisions it records, committed together. The spans and
/// summaries borrow from the batches read in the step's read transaction (`'t`) and are encoded
/// from there ([`StepOutput::finish`]) before it ends: no span is copied but into its output.
#[derive(Default)]
pub(super) struct StepOutput<'t> {
    builder: SubsetBuilder,
    spans: Vec<batch::SpanRecordRef<'t>>,
    span_bytes: usize,
    /// Finished output batches, each at most about `batch_limit` bytes of spans.
    full: Vec<batch::SpanBatchRef<'t>>,
    /// Seal output batches at this many bytes of spans.
    pub(super) batch_limit: usize,
    /// Stop deciding once this many bytes of spans were emitted in the step.
    pub(super) step_limit: usize,
    /// Bytes of spans emitted in the step.
    pub(super) emitted: usize,
    /// Decisions made or extended in this step, by trace id, and whether one is stored already.
    pub(super) decisions: FastMap<[u8; 16], (Decision, bool)>,
    /// What spanmetrics gets of the spans ingested and decided in this step.
    pub(super) summaries: Summaries<'t>,
    /// Batches opened (checked) in this step, by sequence number: each is checked once a step.
    pub(super) sources: FastMap<u64, &'t ArchivedSpanBatch>,
}

/// A step's output, encoded and owned: what the write transaction appends and records.
pub(super) struct EncodedOutput {
    pub(super) kept_spans: Vec<Vec<u8>>,
    pub(super) summaries: Vec<Vec<u8>>,
    pub(super) decisions: FastMap<[u8; 16], (Decision, bool)>,
}

impl<'t> StepOutput<'t> {
    /// An empty output for a step reading at most `step_limit` bytes.
    pub(super) fn new(step_limit: usize) -> StepOutput<'t> {
        StepOutput {
            batch_limit: step_limit.min(MAX_OUTPUT_BATCH_BYTES),
            step_limit,
            // Sized once for the step's bound instead of grown (and rehashed) seven times.
            decisions: FastMap::with_capacity_and_hasher(MAX_DECISIONS_PER_STEP, Default::default()),
            ..StepOutput::default()
        }
    }

    pub(super) fn emit(&mut self, seq: u64, source: &'t ArchivedSpanBatch, index: u32, mark: Option<&policies::Mark>) {
        if let Some(span) = source.spans.get(index as usize) {
            // Seal before a span would take the batch past the limit (a span above the limit on
            // its own still gets a batch of its own).
            if self.span_bytes + span.body.len() > self.batch_limit {
                self.seal();
            }
            let scope = self.builder.scope(seq, span.scope.to_native(), &source.resources, &source.scopes);
            self.span_bytes += span.body.len();
            self.emitted += span.body.len();
            let body = match mark {
                Some(mark) => mark.body(span.body.as_slice()),
                None => batch::SpanBody::Borrowed { body: span.body.as_slice(), tail: None },
            };
            self.spans.push(batch::SpanRecordRef::of(span, scope, body));
        }
    }

    /// A span whose trace was decided before it arrived (a late span) follows the decision: it
    /// is emitted when the trace was kept (with the mark of the policy that kept it), counted
    /// under the rule of both ingest and decision, and extends the decision's `last_seq`.
    /// Returns whether it was kept.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn follow(
        &mut self,
        settings: &summaries::SeriesSettings,
        seq: u64,
        source: &'t ArchivedSpanBatch,
        index: u32,
        trace_id: [u8; 16],
        (mut decision, stored): (Decision, bool),
        mark: Option<&policies::Mark>,
    ) -> bool {
        if decision.keep {
            self.emit(seq, source, index, mark);
        }
        self.summarize(settings, source, index, !settings.kept_only || decision.keep, decision.keep);
        decision.last_seq = decision.last_seq.max(seq);
        self.decisions.insert(trace_id, (decision, stored));
        decision.keep
    }

    /// Counts the span for spanmetrics when `count`, offers it as an exemplar when `kept`
    /// ([`Summaries::add`]); a new series counts against the step's output limit like an
    /// emitted span.
    pub(super) fn summarize(
        &mut self,
        settings: &summaries::SeriesSettings,
        source: &'t ArchivedSpanBatch,
        index: u32,
        count: bool,
        kept: bool,
    ) {
        self.emitted += self.summaries.add(settings, source, index, count, kept);
    }

    /// Closes the batch being built.
    fn seal(&mut self) {
        if self.spans.is_empty() {
            return;
        }
        let (resources, scopes) = self.builder.take();
        let spans = std::mem::take(&mut self.spans);
        self.span_bytes = 0;
        self.full.push(batch::SpanBatchRef { received_unix_nano: pipeline_now(), resources, scopes, spans });
    }

    /// Encodes the output batches (summaries stamped `decided_unix_nano`), ending the borrow of
    /// the read transaction.
    pub(super) fn finish(
        mut self,
        settings: &summaries::SeriesSettings,
        decided_unix_nano: u64,
    ) -> Result<EncodedOutput, StageError> {
        self.seal();
        let kept_spans = self.full.iter().map(batch::encode_span_refs).collect::<Result<_, _>>()?;
        let summaries = self.summaries.finish(settings, decided_unix_nano)?;
        Ok(EncodedOutput { kept_spans, summaries, decisions: self.decisions })
    }
}
