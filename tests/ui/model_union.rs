use earnorm::prelude::*;

#[derive(Model)]
pub union Bits {
    a: u32,
    b: f32,
}

fn main() {}
