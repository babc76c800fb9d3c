use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct Address {
    pub city: String,
}

#[derive(Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    #[serde(flatten)]
    pub address: Address,
}

// One mistake in the model is one error: its uses do not add more.
async fn first_user() -> earnorm::Result<Option<User>> {
    User::find_one(earnorm::bson::doc! {}).await
}

fn main() {
    let _ = first_user();
}
