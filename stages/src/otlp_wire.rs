// TEMPORARY compile stub; replaced by the real module.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError { #[error("{0}")] Other(String) }
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal { Traces, Logs, Metrics }
pub fn transcode_traces(_r: &[u8], _n: u64) -> Result<tailgate_ipc::batch::SpanBatch, WireError> { Err(WireError::Other("stub".into())) }
pub fn transcode_logs(_r: &[u8], _n: u64) -> Result<tailgate_ipc::batch::LogBatch, WireError> { Err(WireError::Other("stub".into())) }
pub fn count_metric_points(_r: &[u8]) -> Result<u32, WireError> { Err(WireError::Other("stub".into())) }
pub fn encode_resource_group(_out: &mut Vec<u8>, _resource: &[u8], _rs: &str, _scope: &[u8], _ss: &str, _items: &mut dyn Iterator<Item = &[u8]>) {}
pub fn parse_partial_success(_r: &[u8]) -> Result<(i64, String), WireError> { Ok((0, String::new())) }
pub fn json_to_protobuf(_s: Signal, _j: &[u8]) -> Result<Vec<u8>, WireError> { Err(WireError::Other("stub".into())) }
