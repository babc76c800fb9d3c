use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "a")]
pub struct Stamped {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    #[earnorm(created_at)]
    pub created: String,
    #[earnorm(updated_at)]
    pub updated: Option<i64>,
}

fn main() {}
