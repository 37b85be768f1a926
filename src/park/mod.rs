//! Parking: copies of spooled messages kept on the brokers (docs/HA.md, "Parking").

pub(crate) mod drains;
