//! The `creditd` command: `serve` (default), `demo`, `migrate`,
//! `reconcile`, `grant`, `balance`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use creditd::app;
use creditd::config::Settings;
use creditd::runtime::Runtime;

#[derive(Parser)]
#[command(name = "creditd", version, about = "Prepaid AI-credits ledger service")]
struct Cli {
    /// Configuration file (default: the committed config.toml); the
    /// environment (CREDITD__SECTION__KEY) overrides it.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the HTTP service on `server.bind` (the default command).
    Serve,
    /// Runs the whole product on this machine with local stand-ins for
    /// Clerk, Stripe and the AI provider (loopback only, no real keys).
    Demo,
    /// Applies the database migrations in `sql/`.
    Migrate,
    /// Checks the ledger invariants against PostgreSQL; exits 1 if any broke.
    Reconcile,
    /// Credits (or, with a negative amount, debits) a user, by Clerk id.
    Grant {
        /// The user's Clerk id (created when new).
        #[arg(long)]
        user: String,
        /// Amount in EUR, e.g. 5 or 2.50 or -1.25.
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        /// Why, recorded on the transaction.
        #[arg(long)]
        reason: String,
        /// Idempotency key (default: a new one, so every run applies).
        #[arg(long)]
        key: Option<String>,
    },
    /// Prints a user's balance, by Clerk id.
    Balance {
        #[arg(long)]
        user: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("creditd: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    app::init_logging(&settings.log);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match Runtime::build(settings) {
            Ok(runtime) => app::serve(runtime),
            Err(error) => {
                eprintln!("creditd: invalid configuration: {error}");
                return ExitCode::from(2);
            }
        },
        Command::Demo => creditd::demo::run(settings),
        Command::Migrate => app::run_migrate(settings),
        Command::Reconcile => app::run_reconcile(settings),
        Command::Grant {
            user,
            amount,
            reason,
            key,
        } => app::run_grant(settings, &user, &amount, &reason, key),
        Command::Balance { user } => app::run_balance(settings, &user),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("creditd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
