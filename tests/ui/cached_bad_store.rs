use earnorm::prelude::*;

#[cached(ttl = 60, scope = "x", store = "maybe")]
async fn value() -> u32 {
    1
}

fn main() {}
