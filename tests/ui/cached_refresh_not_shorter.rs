use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "a", cache(ttl = 30, refresh = 30))]
pub struct Report {
    #[serde(rename = "_id")]
    pub id: ObjectId,
}

impl Report {
    #[cached(ttl = 60, refresh = 90)]
    pub async fn total() -> Result<u64, String> {
        Ok(1)
    }
}

fn main() {}
