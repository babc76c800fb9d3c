use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "a", cache(missing = 30))]
pub struct NoTtl {
    #[serde(rename = "_id")]
    pub id: ObjectId,
}

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "b", cache(ttl = "300", missing = 0))]
pub struct NotSeconds {
    #[serde(rename = "_id")]
    pub id: ObjectId,
}

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "c", cache(ttl = 300, negative = 30))]
pub struct UnknownOption {
    #[serde(rename = "_id")]
    pub id: ObjectId,
}

fn main() {}
