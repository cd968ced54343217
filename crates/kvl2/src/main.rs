//! `kvl2`: the command line of the KV L2 store.
//!
//! Exit codes: 0 ok, 1 miss, 2 bad usage or configuration, 3 storage error.
#![forbid(unsafe_code)]

mod bench;
mod commands;
mod exit;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::store::StoreArgs;

#[derive(Debug, Parser)]
#[command(
    name = "kvl2",
    version,
    about = "Inspect, exercise and benchmark a KV L2 store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate KV offload for a model: store, look up, load and verify chunks; report GB/s.
    Bench(bench::BenchArgs),
    /// Check configurations.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Store FILE's bytes as one chunk under KEY.
    Put {
        #[command(flatten)]
        store: StoreArgs,
        /// The key: `model@ws@worker@hash_hex@dtype` or any page-key string.
        key: String,
        /// The chunk's bytes.
        file: PathBuf,
    },
    /// Load KEY's chunk into OUT.
    Get {
        #[command(flatten)]
        store: StoreArgs,
        /// The key.
        key: String,
        /// Where to write the bytes.
        out: PathBuf,
    },
    /// Which keys are stored: leading-hit count and per-key bits, as JSON.
    Contains {
        #[command(flatten)]
        store: StoreArgs,
        /// Keys, in order.
        keys: Vec<String>,
    },
    /// Delete keys (pinned keys are skipped).
    Rm {
        #[command(flatten)]
        store: StoreArgs,
        /// Keys to delete.
        keys: Vec<String>,
    },
    /// List the chunks of a dynamic store (files, segments or objects), one JSON object per line.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Usage, capacity and counts, as JSON.
    Stat {
        #[command(flatten)]
        store: StoreArgs,
        /// Print the store's metrics once, as JSON (each with its name, type, labels and
        /// value), instead of the summary: its gauges as the store opens (used, capacity,
        /// stored and pinned keys); counters are this command's own, so zero.
        #[arg(long)]
        json: bool,
    },
    /// Run one LRU eviction pass now.
    Evict {
        #[command(flatten)]
        store: StoreArgs,
        /// Fraction of the keys to evict.
        #[arg(long, default_value_t = 0.2)]
        ratio: f64,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the normalised spec (secrets redacted), or every error with its key (exit 2).
    Check {
        /// LMCache configuration files.
        #[arg(long = "config", value_name = "FILE")]
        configs: Vec<PathBuf>,
        /// --l2-adapter JSON values, in order.
        #[arg(long = "l2-adapter", value_name = "JSON")]
        adapters: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() { 2 } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let result = match &cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Config {
            command: ConfigCommand::Check { configs, adapters },
        } => commands::config_check(configs, adapters),
        Command::Put { store, key, file } => commands::put(store, key, file),
        Command::Get { store, key, out } => commands::get(store, key, out),
        Command::Contains { store, keys } => commands::contains(store, keys),
        Command::Rm { store, keys } => commands::rm(store, keys),
        Command::Ls { store } => commands::ls(store),
        Command::Stat { store, json } => commands::stat(store, *json),
        Command::Evict { store, ratio } => commands::evict(store, *ratio),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if !err.message.is_empty() {
                eprintln!("kvl2: {}", err.message);
            }
            err.exit_code()
        }
    }
}
