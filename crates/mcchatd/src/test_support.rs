//! Helpers shared by the crate's unit tests.

use mcchat_core::config::{Found, Origin};
use mcchat_core::room::Registry;

use crate::settings::Settings;

/// Settings from a rooms file's text, with no flags.
pub(crate) fn settings(text: &str) -> Settings {
    let registry = Registry::from_toml(text, "test rooms.toml").expect("rooms");
    let daemon = crate::config::DaemonSettings::from_registry(&registry, "test rooms.toml")
        .expect("daemon settings");
    let web = crate::web::config::WebSettings::from_registry(&registry, "test rooms.toml")
        .expect("web settings");
    let sites = crate::sites::config::SitesSettings::from_registry(&registry, "test rooms.toml")
        .and_then(|s| s.with_flags(None, &[], "test rooms.toml"))
        .expect("sites settings");
    Settings {
        registry,
        daemon,
        web,
        sites,
        origin: Origin {
            path: None,
            found: Found::BuiltIn,
        },
    }
}
