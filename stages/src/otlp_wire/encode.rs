//! Writing export requests back out of stored wire bytes.

/// Appends one `resource_spans` / `resource_logs` entry (field 1 of the export request) holding
/// one scope with the given encoded spans or log records. Empty resource, scope and schema URLs
/// are omitted. Lengths are computed first, so the entry is written in one pass, fields in
/// number order (as prost writes them).
pub fn encode_resource_group(
    out: &mut Vec<u8>,
    resource: &[u8],
    resource_schema_url: &str,
    scope: &[u8],
    scope_schema_url: &str,
    items: &mut dyn Iterator<Item = &[u8]>,
) {
    let items: Vec<&[u8]> = items.collect();
    let scope_group_len = optional_field_len(scope.len())
        + items.iter().map(|item| field_len(item.len())).sum::<usize>()
        + optional_field_len(scope_schema_url.len());
    let group_len =
        optional_field_len(resource.len()) + field_len(scope_group_len) + optional_field_len(resource_schema_url.len());
    out.reserve(field_len(group_len));
    put_header(out, 1, group_len);
    put_optional_field(out, 1, resource);
    put_header(out, 2, scope_group_len);
    put_optional_field(out, 1, scope);
    for item in items {
        put_field(out, 2, item);
    }
    put_optional_field(out, 3, scope_schema_url.as_bytes());
    put_optional_field(out, 3, resource_schema_url.as_bytes());
}

/// One scope of a resource entry: its encoded scope, schema URL and items.
pub struct ScopeItems<'a> {
    /// Encoded `InstrumentationScope` (may be empty).
    pub scope: &'a [u8],
    /// The scope's `schema_url`.
    pub schema_url: &'a str,
    /// Encoded spans or log records.
    pub items: Vec<&'a [u8]>,
}

/// Appends one `resource_spans` / `resource_logs` entry holding every given scope: a resource
/// shared by several scopes (or batches) is written once.
pub fn encode_resource(out: &mut Vec<u8>, resource: &[u8], resource_schema_url: &str, scopes: &[ScopeItems<'_>]) {
    let scope_len = |scope: &ScopeItems<'_>| {
        optional_field_len(scope.scope.len())
            + scope.items.iter().map(|item| field_len(item.len())).sum::<usize>()
            + optional_field_len(scope.schema_url.len())
    };
    let group_len = optional_field_len(resource.len())
        + scopes.iter().map(|scope| field_len(scope_len(scope))).sum::<usize>()
        + optional_field_len(resource_schema_url.len());
    out.reserve(field_len(group_len));
    put_header(out, 1, group_len);
    put_optional_field(out, 1, resource);
    for scope in scopes {
        put_header(out, 2, scope_len(scope));
        put_optional_field(out, 1, scope.scope);
        for item in &scope.items {
            put_field(out, 2, item);
        }
        put_optional_field(out, 3, scope.schema_url.as_bytes());
    }
    put_optional_field(out, 3, resource_schema_url.as_bytes());
}

fn varint_len(value: usize) -> usize {
    let bits = usize::BITS - (value | 1).leading_zeros();
    bits.div_ceil(7) as usize
}

/// Encoded size of a length-delimited field with a one-byte key.
fn field_len(payload: usize) -> usize {
    1 + varint_len(payload) + payload
}

/// Size of the field, or 0 when it is empty and omitted.
fn optional_field_len(payload: usize) -> usize {
    if payload == 0 { 0 } else { field_len(payload) }
}

fn put_header(out: &mut Vec<u8>, number: u8, len: usize) {
    out.push(number << 3 | 2);
    let mut value = len;
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_field(out: &mut Vec<u8>, number: u8, payload: &[u8]) {
    put_header(out, number, payload.len());
    out.extend_from_slice(payload);
}

fn put_optional_field(out: &mut Vec<u8>, number: u8, payload: &[u8]) {
    if !payload.is_empty() {
        put_field(out, number, payload);
    }
}
