//! What a connection takes from the process environment besides its URL.
//!
//! sqlx, like libpq, fills what a URL leaves out from `PG*` environment
//! variables and the password file: `PGPASSWORD`, `PGPASSFILE` /
//! `~/.pgpass`, `PGUSER`, `PGHOST`, `PGPORT`, `PGDATABASE`, `PGAPPNAME`,
//! `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGOPTIONS`. That is what a
//! command-line run wants, and it is what [`connect`] and [`connect_with`]
//! do by default.
//!
//! A process that runs pipeline files written by other people (`faucet
//! serve`) calls `faucet_core::libpq::set_config_only(true)` (faucet-core
//! 1.16): from then on every PostgreSQL connection the process opens must take
//! its settings from its URL alone, or a file could borrow the server's own
//! credentials by naming a URL without them. With the `faucet-core-1-16`
//! feature this crate honours that switch exactly as faucet's own connectors
//! do (`faucet_core::libpq::config_only`): a URL without a password connects
//! with an empty one (neither `PGPASSWORD` nor the password file is read);
//! host, port, database and application name the URL leaves out are pinned
//! to libpq's defaults instead of the variables; and a URL that leaves out a
//! setting the stores cannot pin (the user while `PGUSER` is set, a client
//! certificate or key, a root certificate, server options) is refused with an
//! error naming the variable. Without the feature (faucet-core 1.0) there is
//! no such switch, and the environment applies as described above.
//! [`from_pool`] connects with whatever pool it is given.
//!
//! [`connect`]: crate::PostgresStateStore::connect
//! [`connect_with`]: crate::PostgresStateStore::connect_with
//! [`from_pool`]: crate::PostgresStateStore::from_pool

use sqlx::postgres::PgConnectOptions;

/// The name refusals start with.
#[cfg(feature = "faucet-core-1-16")]
const CONNECTOR: &str = "postgres state store";

/// `url` as the options every connection of the store opens with: the
/// environment fills the gaps unless faucet's config-only switch is on.
/// `Err` holds why the URL was refused or could not be parsed.
pub(crate) fn connect_options(url: &str) -> Result<PgConnectOptions, String> {
    #[cfg(feature = "faucet-core-1-16")]
    if faucet_core::libpq::config_only_enabled() {
        return config_only_options(url, |name| std::env::var(name).ok());
    }
    parse(url)
}

fn parse(url: &str) -> Result<PgConnectOptions, String> {
    url.parse::<PgConnectOptions>()
        .map_err(|e| crate::error::describe_sqlx(&e))
}

/// The options for `url` holding only what it names, `env` standing for the
/// process environment.
#[cfg(feature = "faucet-core-1-16")]
fn config_only_options(
    url: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<PgConnectOptions, String> {
    let pins = faucet_core::libpq::config_only(CONNECTOR, url, env).map_err(|e| match e {
        faucet_core::FaucetError::Config(message) => message,
        other => other.to_string(),
    })?;
    let mut options = parse(url)?;
    // Set after parsing, so whatever the parser took from PGPASSWORD or the
    // password file is replaced: an empty password is sent, and a server
    // that asks for one refuses it.
    if pins.empty_password {
        options = options.password("");
    }
    if pins.default_host {
        options = options.host("localhost");
    }
    if pins.default_port {
        options = options.port(5432);
    }
    if pins.database_from_user {
        let user = options.get_username().to_owned();
        options = options.database(&user);
    }
    if pins.default_application_name {
        options = options.application_name("faucet");
    }
    Ok(options)
}

#[cfg(all(test, feature = "faucet-core-1-16"))]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_environment_fills_nothing_the_url_leaves_out() {
        let env = env_of(&[
            ("PGHOST", "elsewhere"),
            ("PGPORT", "6543"),
            ("PGDATABASE", "other"),
            ("PGAPPNAME", "borrowed"),
        ]);
        let options = config_only_options("postgres:///?user=svc", env).unwrap();
        assert_eq!(options.get_host(), "localhost");
        assert_eq!(options.get_port(), 5432);
        assert_eq!(options.get_database(), Some("svc"));
        assert_eq!(options.get_application_name(), Some("faucet"));
    }

    #[test]
    fn what_the_url_names_is_kept() {
        let env = env_of(&[("PGHOST", "elsewhere"), ("PGPORT", "6543")]);
        let options = config_only_options("postgres://svc:pw@db.internal:7000/app", env).unwrap();
        assert_eq!(options.get_host(), "db.internal");
        assert_eq!(options.get_port(), 7000);
        assert_eq!(options.get_database(), Some("app"));
    }

    #[test]
    fn a_setting_that_cannot_be_pinned_is_refused_naming_the_variable() {
        let error = config_only_options("postgres://db/app", env_of(&[("PGUSER", "svc")]));
        let error = error.unwrap_err();
        assert!(error.contains("names no user"), "{error}");
        let error = config_only_options("postgres://u@db/app", env_of(&[("PGSSLCERT", "/c")]));
        let error = error.unwrap_err();
        assert!(error.contains("PGSSLCERT"), "{error}");
        let error = config_only_options("postgres://u@db/app", env_of(&[("PGOPTIONS", "-c a=b")]));
        let error = error.unwrap_err();
        assert!(error.contains("PGOPTIONS"), "{error}");
    }
}
