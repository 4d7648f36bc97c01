//! The stock `faucet` binary's entry point, built against this repository's
//! faucet-state-postgres (see Cargo.toml's `[patch.crates-io]`).

fn main() -> std::process::ExitCode {
    faucet_cli::run_main(faucet_cli::registry::PluginRegistry::with_builtins())
}
