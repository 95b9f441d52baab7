use layerswap_fast::io::Header;

fn entry(name: &str, dtype: &str, shape: &str, a: u64, b: u64) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{a},{b}]}}"#)
}

#[test]
fn valid_header_parses_sorted_by_offset() {
    let json = format!(
        "{{{},{},\"__metadata__\":{{\"format\":\"pt\"}}}}",
        entry("b", "F32", "[2]", 4, 12),
        entry("a", "BF16", "[2]", 0, 4)
    );
    let h = Header::parse(json.as_bytes(), 12).unwrap();
    assert_eq!(
        h.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(h.metadata["format"], "pt");
}

#[test]
fn scalar_and_empty_tensors_are_allowed() {
    let json = format!(
        "{{{},{}}}",
        entry("s", "F32", "[]", 0, 4),
        entry("e", "F32", "[0, 3]", 4, 4)
    );
    let h = Header::parse(json.as_bytes(), 4).unwrap();
    assert_eq!(h.tensors.len(), 2);
}

fn err(json: &str, data_len: u64) -> String {
    Header::parse(json.as_bytes(), data_len).unwrap_err()
}

#[test]
fn rejects_each_kind_of_bad_header() {
    assert!(err("{", 0).contains("not valid JSON"));
    assert!(err("[1]", 0).contains("not valid JSON"));
    assert!(Header::parse(&[0xff, 0xfe], 0).unwrap_err().contains("UTF-8"));
    assert!(err(&format!("{{{}}}", entry("a", "Q7", "[2]", 0, 4)), 4).contains("unknown dtype 'Q7'"));
    assert!(err(&format!("{{{}}}", entry("a", "F4", "[2]", 0, 1)), 1).contains("unsupported dtype 'F4'"));
    assert!(err(&format!("{{{}}}", entry("a", "F32", "[3]", 0, 8)), 8).contains("needs 12 bytes"));
    assert!(err(&format!("{{{}}}", entry("a", "F32", "[2]", 0, 8)), 4).contains("truncated"));
    assert!(err(
        &format!(
            "{{{},{}}}",
            entry("a", "F32", "[2]", 0, 8),
            entry("b", "F32", "[2]", 4, 12)
        ),
        12
    )
    .contains("overlaps"));
    assert!(err(
        &format!(
            "{{{},{}}}",
            entry("a", "F32", "[1]", 0, 4),
            entry("b", "F32", "[1]", 8, 12)
        ),
        12
    )
    .contains("gap"));
    assert!(err(
        &format!(
            "{{{},{}}}",
            entry("a", "F32", "[1]", 0, 4),
            entry("a", "F32", "[1]", 4, 8)
        ),
        8
    )
    .contains("twice"));
    assert!(err(r#"{"__metadata__":[1]}"#, 0).contains("__metadata__"));
    assert!(err(r#"{"__metadata__":{"k":1}}"#, 0).contains("__metadata__"));
    assert!(err(&format!("{{{}}}", entry("a", "F32", "[1]", 0, 4)), 8).contains("cover 4"));
    assert!(err(
        &format!(
            "{{{}}}",
            entry("a", "F32", "[4294967296, 4294967296, 4294967296]", 0, 4)
        ),
        4
    )
    .contains("too large"));
    assert!(err(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, 4).contains("non-negative"));
    assert!(err(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, 4).contains("end before start"));
}

#[test]
fn non_float_dtypes_parse_with_their_sizes() {
    use layerswap_fast::dtype::Dtype;
    let json = format!(
        "{{{},{},{}}}",
        entry("mask", "BOOL", "[2, 2]", 0, 4),
        entry("ids", "I64", "[3]", 4, 28),
        entry("w", "BF16", "[2]", 28, 32)
    );
    let h = Header::parse(json.as_bytes(), 32).unwrap();
    let d: Vec<(String, bool, usize)> = h
        .tensors
        .iter()
        .map(|t| (t.dtype.name().to_string(), t.dtype.is_float(), t.dtype.size()))
        .collect();
    assert_eq!(
        d,
        [
            ("BOOL".into(), false, 1),
            ("I64".into(), false, 8),
            ("BF16".into(), true, 2)
        ]
    );
    assert_eq!(
        Dtype::parse("f8_e4m3").map(layerswap_fast::dtype::Dtype::size),
        Some(1)
    );
    // Serialised as the safetensors name, both ways.
    assert_eq!(
        serde_json::to_string(&Dtype::parse("I64").unwrap()).unwrap(),
        "\"I64\""
    );
    assert_eq!(serde_json::from_str::<Dtype>("\"BF16\"").unwrap(), Dtype::BF16);
}
