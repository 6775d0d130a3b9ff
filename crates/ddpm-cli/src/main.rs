//! `ddpm-cli`: train and sample diffusion models on MNIST-style data.

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ddpm-cli",
    version,
    about = "Denoising diffusion models (DDPM / Improved DDPM) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a diffusion model (flags as improved-diffusion's image_train.py).
    #[command(args_override_self = true, allow_negative_numbers = true)]
    Train(ddpm_cli::train::TrainArgs),
    /// Sample images from a checkpoint: PNG grid, npz, GIF of the chain.
    #[command(allow_negative_numbers = true)]
    Sample(ddpm_cli::sample::SampleArgs),
    /// Bits/dim (the variational bound) of a checkpoint on a data split.
    #[command(allow_negative_numbers = true)]
    Nll(ddpm_cli::nll::NllArgs),
    /// Sample quality on MNIST: Fréchet distance and Inception Score from a digit classifier.
    #[command(allow_negative_numbers = true)]
    Eval(ddpm_cli::eval::EvalArgs),
}

fn main() -> ExitCode {
    ddpm_train::tune_threads();
    ddpm_train::tune_mimalloc();
    ddpm_cli::init_logging();
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let (Command::Train(args), Some(("train", m))) = (&mut cli.command, matches.subcommand()) {
        if let Some(train) = command.find_subcommand("train") {
            args.explicit = ddpm_cli::explicit_flags(train, m);
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ddpm_cli::error_message(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => {
            let stop = ddpm_cli::ctrlc_stop_flag()?;
            ddpm_cli::train::run(&args, Some(stop))?;
            Ok(())
        }
        Command::Sample(args) => {
            ddpm_cli::sample::run(&args)?;
            Ok(())
        }
        Command::Nll(args) => {
            ddpm_cli::nll::run(&args)?;
            Ok(())
        }
        Command::Eval(args) => {
            ddpm_cli::eval::run(&args)?;
            Ok(())
        }
    }
}
