//! Compile-fail tests: each misuse of `#[derive(Model)]` or `#[cached]` is an
//! error at the offending token. One file per mistake under `tests/ui/`,
//! with the expected compiler output beside it.

#[test]
fn misuse_is_a_spanned_compile_error() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
