use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "a")]
pub struct TextVersion {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    #[earnorm(version)]
    pub version: String,
}

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "b")]
pub struct TwoVersions {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    #[earnorm(version)]
    pub one: i64,
    #[earnorm(version)]
    pub two: i64,
}

fn main() {}
