use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = "a", collection = "b")]
pub struct User {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    #[earnorm(required, required)]
    pub name: String,
}

fn main() {}
