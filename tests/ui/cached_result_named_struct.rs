use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct SearchResult<T> {
    pub hits: Vec<T>,
}

// Named like a `Result`, but a plain struct: say what to store.
#[cached(ttl = 60, scope = "search")]
async fn search(query: String) -> SearchResult<String> {
    SearchResult { hits: vec![query] }
}

fn main() {}
