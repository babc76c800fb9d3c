use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    #[earnorm(min = "zero", max_length = -1)]
    pub name: String,
}

fn main() {}
