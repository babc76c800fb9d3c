use earnorm::prelude::*;

// A free function needs `scope = ".."`: there is no model to scope it by.
#[cached(ttl = 60)]
async fn exchange_rate(currency: String) -> f64 {
    if currency == "EUR" { 1.1 } else { 1.0 }
}

fn main() {}
