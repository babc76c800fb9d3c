use earnorm::prelude::*;

pub struct Plain {
    pub name: String,
}

impl Plain {
    #[cached(ttl = 60)]
    pub async fn name_len(&self) -> usize {
        self.name.len()
    }
}

fn main() {}
