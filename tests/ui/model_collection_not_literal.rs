use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

const NAME: &str = "users";

#[derive(Serialize, Deserialize, Model)]
#[earnorm(collection = NAME)]
pub struct User {
    #[serde(rename = "_id")]
    pub id: ObjectId,
}

fn main() {}
