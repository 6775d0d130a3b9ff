//! `ddpm-cli`: train, sample and evaluate diffusion models on MNIST, image folders and CIFAR-10.

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
    /// Draw a run's loss plot (loss.png) and, once scored, its quality curve (quality.png).
    Plot(ddpm_cli::plot::PlotArgs),
    /// Score every checkpoint of a run (FD at n = 1000, bits/dim on a test subset) and draw
    /// FD against minutes of training (quality.png, quality.json).
    QualityCurve(ddpm_cli::plot::QualityArgs),
}

fn main() -> ExitCode {
    ddpm_cli::tune_threads();
    ddpm_cli::tune_mimalloc();
    ddpm_cli::init_logging();
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let (Command::Train(args), Some(("train", m))) = (&mut cli.command, matches.subcommand()) {
        // The flags typed count as given (a resumed run compares them with its checkpoint);
        // a preset's are defaults that the typed ones override.
        let explicit = command
            .find_subcommand("train")
            .map(|train| ddpm_cli::explicit_flags(train, m))
            .unwrap_or_default();
        if let Some(preset) = args.preset {
            let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
            let at = argv
                .iter()
                .skip(1)
                .position(|a| a == "train")
                .map_or(argv.len(), |i| i + 2);
            argv.splice(at..at, preset.flags().into_iter().map(Into::into));
            match Cli::try_parse_from(argv) {
                Ok(Cli {
                    command: Command::Train(with_preset),
                }) => *args = with_preset,
                // The train subcommand parses as train.
                Ok(_) => {}
                Err(e) => e.exit(),
            }
        }
        args.explicit = explicit;
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
        Command::Plot(args) => {
            for p in ddpm_cli::plot::plot(&args)? {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Command::QualityCurve(args) => {
            let points = ddpm_cli::plot::quality_curve(&args)?;
            print!("{}", ddpm_cli::plot::table(&points));
            println!("wrote {}", args.run.join("quality.png").display());
            Ok(())
        }
    }
}
