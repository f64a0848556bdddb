//! `ckptctl`: the operator tool. Parses the command line and hands it to `ckptd::cli`; see that
//! module for the commands and exit codes.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use ckptd::cli::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    let args = match Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // --help and --version land here too, and succeed.
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(cli::EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    cli::init_logging();
    let progress = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    match cli::run(args, &mut out, progress) {
        Ok(code) => code,
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::from(cli::EXIT_FAILURE),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{}", cli::error_line(&e));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
