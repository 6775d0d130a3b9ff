//! `cargo xtask`: project automation for ddpm-rs (reference checks, datasets, training runs,
//! golden tests and benchmarks).

mod bench;
mod figures;
mod golden;
mod mnist;
mod reference;
mod web;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ddpm-rs project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the port against cases computed by the original Python implementation.
    ReferenceCheck {
        /// The cases file (default: the project's own, xtask/reference/cases.json).
        #[arg(long)]
        cases: Option<PathBuf>,
        /// Also print the cases that pass.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Build the web page that samples a model in the browser (wasm32 + wasm-bindgen, installed
    /// when missing) into target/web and serve it on 127.0.0.1.
    Web(web::WebArgs),
    /// Sample in headless Chromium from the served page and compare the canvas with
    /// `ddpm-cli sample` (same model, seed and solver); check the page's error for a file that
    /// is not a checkpoint; save a screenshot.
    WebTest(web::WebTestArgs),
    /// Write a checkpoint's config.json and weights (f16) as the web page's default model.
    WebModel(web::WebModelArgs),
    /// Fetch MNIST from the canonical mirrors (or --mirror / MNIST_MIRROR), verified by SHA-256.
    DownloadMnist(mnist::DownloadArgs),
    /// Download MNIST if needed and train a diffusion model on it (the main job).
    TrainMnist(mnist::TrainMnistArgs),
    /// Draw the explainer's figures (forward and reverse processes, DDIM inversion and
    /// interpolation, steps against quality, the bound term by term) from a trained model into
    /// docs/figures; the same checkpoint and seed give byte-identical files.
    Figures(figures::FigureArgs),
    /// Draw a seeded set of 32x32 colour shapes (discs, squares, triangles, rings in random
    /// colours, sizes and places, on dark backgrounds) as PNGs in one folder per shape: a colour
    /// data set to try RGB training on.
    MakeShapes {
        /// The folder to write (created; must not hold images already).
        #[arg(long, default_value = "data/shapes")]
        out: PathBuf,
        /// Images per shape.
        #[arg(long, default_value_t = 1000)]
        per_class: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a split of an IDX or CIFAR-10 data set as PNG files: `OUT/00000.png` ... (in data
    /// order), or `OUT/<class>/00000.png` with --class-folders.
    ExportPng {
        /// The data folder (IDX files or CIFAR-10 batches).
        #[arg(long)]
        data: PathBuf,
        /// train or test.
        #[arg(long, default_value = "train")]
        split: String,
        /// The folder to write (created; must not hold images already).
        #[arg(long)]
        out: PathBuf,
        /// One sub-folder per class (the classes an image folder takes from them).
        #[arg(long)]
        class_folders: bool,
    },
    /// Golden-sample regression tests: fixed-seed samples and training losses of a committed model.
    Golden {
        /// Rewrite the golden arrays and say what changed.
        #[arg(long)]
        bless: bool,
        /// Retrain the golden model first, from MNIST in this folder (implies --bless).
        #[arg(long)]
        retrain: Option<PathBuf>,
    },
    /// Retrain the MNIST classifier used by `ddpm-cli eval` and rewrite its committed weights.
    TrainClassifier {
        #[command(flatten)]
        download: mnist::DownloadArgs,
        /// Epochs.
        #[arg(long, default_value_t = 3)]
        epochs: usize,
    },
    /// Score clean real digits (several draws) and deliberately degraded ones with the
    /// evaluator: each degradation must score clearly worse than the floor.
    CheckEvaluator {
        #[command(flatten)]
        download: mnist::DownloadArgs,
        /// Images per draw.
        #[arg(long, default_value_t = 1000)]
        num: usize,
        /// Disjoint draws of clean images.
        #[arg(long, default_value_t = 5)]
        draws: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Score every checkpoint of a run folder (FD at n = 1000 with the default solver, bits/dim
    /// on a test subset) and draw FD against minutes of training: RUN/quality.png.
    QualityCurve(ddpm_cli::plot::QualityArgs),
    /// Measure training and sampling throughput (side by side with the original when
    /// REF_PYTHON and REF_SRC are set).
    Bench {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Batch size.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Untimed iterations first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Timed iterations (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Rounds, each measuring every side in turn; the median round is reported (machine
        /// load drifts, and alternating exposes both sides to it alike).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        /// Restrict our kernels to this family and below (portable, avx2, avx512, avx512bf16,
        /// amx), and the original's to the same with ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA
        /// and MKL_ENABLE_INSTRUCTIONS (avx2 is the laptop comparison). Default: DDPM_ISA, else
        /// everything the CPU has.
        #[arg(long)]
        isa: Option<ddpm_kernels::Isa>,
    },
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// The reference cases computed by the original, kept in the repository.
fn reference_cases() -> PathBuf {
    workspace_root()
        .join("xtask")
        .join("reference")
        .join("cases.json")
}

fn main() -> ExitCode {
    ddpm_cli::tune_threads();
    ddpm_cli::tune_mimalloc();
    ddpm_cli::init_logging();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", ddpm_cli::error_message(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::ReferenceCheck { cases, verbose } => {
            let path = cases.unwrap_or_else(reference_cases);
            let s = reference::run_file(&path, verbose)?;
            println!(
                "{} passed, {} failed, {} unsupported",
                s.passed, s.failed, s.unsupported
            );
            Ok(if s.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Web(args) => {
            web::web(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::WebTest(args) => {
            let report = web::web_test(&args)?;
            println!(
                "web-test passed: {} samples in {:.2} s in Chromium, {:.2} s native; canvas vs \
                 ddpm-cli: max diff {}, mean {:.4}, {:.2}% of values differ; wasm {:.2} MB; \
                 screenshot {}",
                args.num,
                report.browser_seconds,
                report.native_seconds,
                report.max_abs_diff,
                report.mean_abs_diff,
                100.0 * report.differing,
                report.wasm_bytes as f64 / 1e6,
                report.screenshot.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::WebModel(args) => {
            web::web_model(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DownloadMnist(args) => {
            mnist::download(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::TrainMnist(args) => {
            mnist::train(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Figures(args) => {
            for p in figures::run(&args)? {
                println!("wrote {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MakeShapes {
            out,
            per_class,
            seed,
        } => {
            let n = mnist::make_shapes(&out, per_class, seed)?;
            println!("wrote {n} images under {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::ExportPng {
            data,
            split,
            out,
            class_folders,
        } => {
            let n = mnist::export_png(&data, split.parse()?, &out, class_folders)?;
            println!("wrote {n} images under {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::TrainClassifier { download, epochs } => {
            mnist::download(&download)?;
            mnist::train_classifier(&download.dir, epochs)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckEvaluator {
            download,
            num,
            draws,
            json,
        } => {
            mnist::download(&download)?;
            let (train, test) = (
                ddpm_train::ImageDataset::load(&download.dir, ddpm_train::Split::Train)?,
                ddpm_train::ImageDataset::load(&download.dir, ddpm_train::Split::Test)?,
            );
            let clf = ddpm_train::eval::Classifier::pretrained(&candle_core::Device::Cpu)?;
            let check = ddpm_train::degrade::check_evaluator(&clf, &train, &test, num, draws, 0)?;
            if json {
                println!("{}", serde_json::to_string(&check)?);
            } else {
                print!("{}", check.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::QualityCurve(args) => {
            let points = ddpm_cli::plot::quality_curve(&args)?;
            print!("{}", ddpm_cli::plot::table(&points));
            println!("wrote {}", args.run.join("quality.png").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Golden { bless, retrain } => {
            let ok = golden::run(bless || retrain.is_some(), retrain.as_deref())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench {
            json,
            batch,
            warmup,
            iters,
            rounds,
            isa,
        } => {
            let isa = match isa {
                Some(i) => Some(i),
                None => ddpm_kernels::isa_from_env().context("DDPM_ISA")?,
            };
            bench::run(bench::BenchOptions {
                batch,
                warmup,
                iters,
                rounds: rounds as usize,
                json,
                isa,
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
