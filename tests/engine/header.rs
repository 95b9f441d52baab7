use layerswap_fast::io::Header;

fn entry(name: &str, dtype: &str, shape: &str, a: u64, b: u64) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{a},{b}]}}"#)
}

#[test]
fn valid_header_parses_sorted_by_offset() {
    let json = format!("{{{},{},\"__metadata__\":{{\"format\":\"pt\"}}}}", entry("b", "F32", "[2]", 4, 12), entry("a", "BF16", "[2]", 0, 4));
    let h = Header::parse(json.as_bytes(), 12).unwrap();
    assert_eq!(h.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(h.metadata["format"], "pt");
}

#[test]
fn scalar_and_empty_tensors_are_allowed() {
    let json = format!("{{{},{}}}", entry("s", "F32", "[]", 0, 4), entry("e", "F32", "[0, 3]", 4, 4));
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
    assert!(err(&format!("{{{}}}", entry("a", "I8", "[2]", 0, 2)), 2).contains("unsupported dtype 'I8'"));
    assert!(err(&format!("{{{}}}", entry("a", "F32", "[3]", 0, 8)), 8).contains("needs 12 bytes"));
    assert!(err(&format!("{{{}}}", entry("a", "F32", "[2]", 0, 8)), 4).contains("truncated"));
    assert!(err(&format!("{{{},{}}}", entry("a", "F32", "[2]", 0, 8), entry("b", "F32", "[2]", 4, 12)), 12).contains("overlaps"));
    assert!(err(&format!("{{{},{}}}", entry("a", "F32", "[1]", 0, 4), entry("b", "F32", "[1]", 8, 12)), 12).contains("gap"));
    assert!(err(&format!("{{{},{}}}", entry("a", "F32", "[1]", 0, 4), entry("a", "F32", "[1]", 4, 8)), 8).contains("twice"));
    assert!(err(r#"{"__metadata__":[1]}"#, 0).contains("__metadata__"));
    assert!(err(r#"{"__metadata__":{"k":1}}"#, 0).contains("__metadata__"));
    assert!(err(&format!("{{{}}}", entry("a", "F32", "[1]", 0, 4)), 8).contains("cover 4"));
    assert!(err(&format!("{{{}}}", entry("a", "F32", "[4294967296, 4294967296, 4294967296]", 0, 4)), 4).contains("too large"));
    assert!(err(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, 4).contains("non-negative"));
    assert!(err(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, 4).contains("end before start"));
}
