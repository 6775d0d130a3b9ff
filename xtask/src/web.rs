//! `cargo xtask web`, `web-test` and `web-model`: the page that samples a model in the browser.
//!
//! `web` builds crates/ddpm-web for wasm32 (installing the target and wasm-bindgen-cli at the
//! version in Cargo.lock when missing), gathers the wasm, the page (crates/ddpm-web/www) and a
//! checkpoint into one folder and serves it on 127.0.0.1. `web-test` does the same on a free
//! port, samples in headless Chromium and compares the canvas with `ddpm-cli sample`.

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The web crate's folder.
fn web_crate() -> PathBuf {
    crate::workspace_root().join("crates/ddpm-web")
}

/// The committed default model (`cargo xtask web-model` writes it).
pub fn default_model() -> PathBuf {
    web_crate().join("model")
}

/// Options of `cargo xtask web`.
#[derive(Debug, Clone, Args)]
pub struct WebArgs {
    /// The checkpoint the page loads by default (a checkpoint-N folder).
    #[arg(long, default_value_os_t = default_model())]
    pub checkpoint: PathBuf,
    /// Which weights: an EMA rate of the run, or "model" for the raw weights (default: the
    /// first EMA).
    #[arg(long)]
    pub ema: Option<String>,
    /// Where to build the site (a folder this command built before is replaced).
    #[arg(long, default_value_os_t = crate::workspace_root().join("target/web"))]
    pub out: PathBuf,
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Build only; do not serve.
    #[arg(long)]
    pub no_serve: bool,
}

/// Options of `cargo xtask web-test`.
#[derive(Debug, Clone, Args)]
pub struct WebTestArgs {
    /// Where the site, the screenshot and the reference grid go.
    #[arg(long, default_value_os_t = crate::workspace_root().join("target/web-test"))]
    pub out: PathBuf,
    /// The Chromium (or Chrome) binary.
    #[arg(long, env = "CHROMIUM", default_value = "/usr/bin/chromium")]
    pub chromium: PathBuf,
    /// Seconds the page may take to load and sample.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Samples.
    #[arg(long, default_value_t = 16)]
    pub num: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Sampling steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Solver.
    #[arg(long, default_value = "ddpm")]
    pub solver: String,
    /// Class of every sample (the default model is class-conditional).
    #[arg(long, default_value_t = 7)]
    pub class: u32,
}

/// Options of `cargo xtask web-model`.
#[derive(Debug, Clone, Args)]
pub struct WebModelArgs {
    /// The checkpoint to ship (a checkpoint-N folder).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which weights (default: the first EMA).
    #[arg(long)]
    pub ema: Option<String>,
    /// The folder to write: config.json and the weights in f16.
    #[arg(long, default_value_os_t = default_model())]
    pub out: PathBuf,
}

/// Runs a command, naming it in the error when it cannot start or fails.
fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Adds the wasm32 target through rustup when the toolchain lacks it.
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup (needed to add the wasm32-unknown-unknown target)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-unknown-unknown")
    {
        return Ok(());
    }
    eprintln!("adding the wasm32-unknown-unknown target (rustup)");
    run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))
}

/// The wasm-bindgen version Cargo.lock pins: the CLI must be the same version.
fn locked_wasm_bindgen_version() -> Result<String> {
    let lock_path = crate::workspace_root().join("Cargo.lock");
    let lock = std::fs::read_to_string(&lock_path)
        .with_context(|| format!("cannot read {}", lock_path.display()))?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"wasm-bindgen\"" {
            if let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = \""))
            {
                return Ok(v.trim_end_matches('"').to_string());
            }
        }
    }
    bail!("{} does not list wasm-bindgen", lock_path.display())
}

/// The wasm-bindgen CLI at the locked version, installed under target/tools when missing.
fn ensure_wasm_bindgen() -> Result<PathBuf> {
    let version = locked_wasm_bindgen_version()?;
    let root = crate::workspace_root().join("target/tools");
    let bin = root.join("bin/wasm-bindgen");
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if have.as_deref() == Some(&format!("wasm-bindgen {version}")) {
        return Ok(bin);
    }
    eprintln!(
        "installing wasm-bindgen-cli {version} into {}",
        root.display()
    );
    let install = |locked: bool| {
        let mut cmd = cargo();
        cmd.args([
            "install",
            "wasm-bindgen-cli",
            "--version",
            &version,
            "--root",
        ])
        .arg(&root);
        if locked {
            cmd.arg("--locked");
        }
        run(&mut cmd)
    };
    // Its own lock file can name a dependency version a registry mirror lacks; then the newest
    // compatible versions do.
    if let Err(e) = install(true) {
        eprintln!("{e:#}; retrying without --locked");
        install(false)?;
    }
    Ok(bin)
}

/// The weights file of `checkpoint` that `ema` names, checked by loading it as `ddpm-cli` does.
fn checked_weights(checkpoint: &Path, ema: Option<&str>) -> Result<PathBuf> {
    let loaded = ddpm_train::checkpoint::load_model(
        checkpoint,
        ema,
        Default::default(),
        &candle_core::Device::Cpu,
    )
    .with_context(|| format!("--checkpoint {}", checkpoint.display()))?;
    Ok(checkpoint.join(format!("{}.safetensors", loaded.weights)))
}

/// The file that marks a folder as a site built here, so that a rebuild may replace it.
const SITE_MARKER: &str = ".ddpm-web-site";

/// Empties `out` for a new build: only a folder this command built (it has [`SITE_MARKER`]),
/// an empty folder, or none at all; anything else is refused, not deleted.
fn clear_site(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    ensure!(
        out.is_dir(),
        "--out {} is a file, not a folder",
        out.display()
    );
    let empty = std::fs::read_dir(out)?.next().is_none();
    if !empty {
        ensure!(
            out.join(SITE_MARKER).exists(),
            "--out {} holds files this command did not build; give a new or empty folder",
            out.display()
        );
        std::fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    Ok(())
}

/// What a build produced.
pub struct Site {
    /// The folder to serve.
    pub dir: PathBuf,
    /// Bytes of the wasm module the page loads.
    pub wasm_bytes: u64,
}

/// Builds the site into `out`: the wasm and its JavaScript glue (pkg/), the page, and the
/// checkpoint as model/config.json + model/weights.safetensors.
pub fn build(checkpoint: &Path, ema: Option<&str>, out: &Path) -> Result<Site> {
    let weights = checked_weights(checkpoint, ema)?;
    ensure_wasm_target()?;
    let bindgen = ensure_wasm_bindgen()?;
    let root = crate::workspace_root();
    run(cargo().current_dir(&root).args([
        "build",
        "--target",
        "wasm32-unknown-unknown",
        "--profile",
        "wasm",
        "-p",
        "ddpm-web",
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let wasm = target_dir.join("wasm32-unknown-unknown/wasm/ddpm_web.wasm");
    clear_site(out)?;
    std::fs::create_dir_all(out.join("model"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join(SITE_MARKER), "built by cargo xtask web\n")?;
    run(Command::new(&bindgen)
        .args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(out.join("pkg"))
        .arg(&wasm))?;
    let www = web_crate().join("www");
    for entry in std::fs::read_dir(&www).with_context(|| format!("{}", www.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), out.join(entry.file_name()))
            .with_context(|| format!("cannot copy {}", entry.path().display()))?;
    }
    std::fs::copy(
        checkpoint.join("config.json"),
        out.join("model/config.json"),
    )?;
    std::fs::copy(&weights, out.join("model/weights.safetensors"))?;
    let wasm_bytes = std::fs::metadata(out.join("pkg/ddpm_web_bg.wasm"))?.len();
    Ok(Site {
        dir: out.to_path_buf(),
        wasm_bytes,
    })
}

/// The content type of a served file, by extension (module scripts and wasm streaming need
/// theirs).
fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "wasm" => "application/wasm",
        "png" => "image/png",
        _ => "application/octet-stream",
    }
}

/// A static file server for `dir` on 127.0.0.1:`port` (0: any free port), in its own thread.
pub struct Server {
    server: std::sync::Arc<tiny_http::Server>,
    /// The page's address.
    pub url: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts serving.
    pub fn start(dir: &Path, port: u16) -> Result<Self> {
        let server = tiny_http::Server::http(("127.0.0.1", port))
            .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1:{port}: {e}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .context("the server has no IP address")?;
        let server = std::sync::Arc::new(server);
        let (s, dir) = (server.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            for request in s.incoming_requests() {
                let _ = respond(&dir, request);
            }
        });
        Ok(Self {
            server,
            url: format!("http://{addr}/"),
            thread: Some(thread),
        })
    }

    /// Serves until the process ends.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The file under `dir` a request for `url` names: plain names only (no "..", root, drive or
/// backslash), so nothing outside `dir`; "/" is index.html; query and fragment are ignored.
fn site_path(dir: &Path, url: &str) -> Option<PathBuf> {
    let url = url.split(['?', '#']).next().unwrap_or("/");
    let rel = url.trim_start_matches('/');
    let rel = if rel.is_empty() { "index.html" } else { rel };
    let safe = !rel.contains(['\\', ':'])
        && rel.split('/').all(|part| !part.is_empty())
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    safe.then(|| dir.join(rel))
}

fn respond(dir: &Path, request: tiny_http::Request) -> std::io::Result<()> {
    let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k, v).expect("ASCII header");
    let found = site_path(dir, request.url()).and_then(|p| Some((std::fs::read(&p).ok()?, p)));
    match found {
        Some((bytes, path)) => request.respond(
            tiny_http::Response::from_data(bytes)
                .with_header(header("Content-Type", content_type(&path)))
                .with_header(header("Cache-Control", "no-store")),
        ),
        None => {
            request.respond(tiny_http::Response::from_string("not found").with_status_code(404))
        }
    }
}

/// `cargo xtask web`.
pub fn web(args: &WebArgs) -> Result<()> {
    let site = build(&args.checkpoint, args.ema.as_deref(), &args.out)?;
    println!(
        "built {} (wasm {:.2} MB)",
        site.dir.display(),
        site.wasm_bytes as f64 / 1e6
    );
    if args.no_serve {
        return Ok(());
    }
    let server = Server::start(&site.dir, args.port)?;
    println!(
        "serving {} at {} (Ctrl-C stops)",
        site.dir.display(),
        server.url
    );
    server.wait();
    Ok(())
}

/// `cargo xtask web-model`: a checkpoint's config.json and weights (in f16, half the bytes)
/// as the page's default model.
pub fn web_model(args: &WebModelArgs) -> Result<()> {
    let weights = checked_weights(&args.checkpoint, args.ema.as_deref())?;
    if let (Ok(a), Ok(b)) = (args.checkpoint.canonicalize(), args.out.canonicalize()) {
        ensure!(
            a != b,
            "--out {} is the checkpoint itself; give another folder",
            args.out.display()
        );
    }
    let tensors = ddpm_unet::read_safetensors(&weights)?;
    let half = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(candle_core::DType::F16)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    // One weights file: an older one left beside the new config would be served instead.
    for entry in std::fs::read_dir(&args.out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    let name = weights.file_name().context("weights file name")?;
    ddpm_unet::write_safetensors(&half, &args.out.join(name))?;
    std::fs::copy(
        args.checkpoint.join("config.json"),
        args.out.join("config.json"),
    )?;
    println!(
        "wrote {} (config.json, {})",
        args.out.display(),
        name.to_string_lossy()
    );
    Ok(())
}

/// The Chromium flags for a closed network and a root user (no sandbox).
const CHROMIUM_ARGS: &[&str] = &[
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// What the browser run measured.
#[derive(Debug, serde::Serialize)]
pub struct WebTestReport {
    /// Seconds the page's worker took to sample.
    pub browser_seconds: f64,
    /// Seconds `ddpm-cli sample` took for the same batch.
    pub native_seconds: f64,
    /// Largest difference of a pixel channel between the canvas and the CLI's grid (0-255).
    pub max_abs_diff: u8,
    /// Mean difference over all pixel channels.
    pub mean_abs_diff: f64,
    /// Fraction of pixel channels that differ at all.
    pub differing: f64,
    /// Bytes of the wasm module.
    pub wasm_bytes: u64,
    /// The screenshot.
    pub screenshot: PathBuf,
}

/// Largest difference of a pixel value (0-255) allowed between the browser's grid and the CLI's.
///
/// The browser runs the portable kernels in wasm, the CLI this machine's fastest (AVX-512 here);
/// their float sums differ in the last bits, so a pixel whose value falls within that of a
/// rounding boundary of the 8-bit grid can come out one level apart. Measured on an AMD EPYC
/// (Zen 5), 16 samples of the default model per run, nine runs (DDPM, DDIM, DPM-Solver++(2M),
/// UniPC; 20 and 50 steps; five seeds; with and without wasm SIMD): at most 1 level, in at most
/// 0.06% of the values; the CLI on its own portable kernels differs from the browser the same
/// way. A difference of 2 levels would mean a float difference above one level (1/127.5), not a
/// rounding flip; this allows one such level of slack for other CPUs and browsers.
pub const MAX_PIXEL_DIFF: u8 = 2;
/// Largest mean difference per pixel value allowed (0-255), about 15 times the largest measured
/// (0.0006): rounding flips stay rare, as they are.
pub const MAX_MEAN_DIFF: f64 = 0.01;

/// `cargo xtask web-test`.
pub fn web_test(args: &WebTestArgs) -> Result<WebTestReport> {
    use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
    ensure!(
        args.chromium.exists(),
        "{} not found: install Chromium (Debian: apt-get install chromium) or give --chromium",
        args.chromium.display()
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = std::path::absolute(&args.out)?;
    let model = default_model();
    let site = build(&model, None, &out.join("site"))?;
    let server = Server::start(&site.dir, 0)?;

    // The reference: ddpm-cli sample with the same model, seed, solver, steps and class.
    let cli_png = out.join("cli.png");
    #[derive(Parser)]
    struct Sample {
        #[command(flatten)]
        args: ddpm_cli::sample::SampleArgs,
    }
    let argv = [
        "sample".to_string(),
        "--checkpoint".into(),
        model.display().to_string(),
        "--num".into(),
        args.num.to_string(),
        "--batch-size".into(),
        args.num.to_string(),
        "--seed".into(),
        args.seed.to_string(),
        "--steps".into(),
        args.steps.to_string(),
        "--solver".into(),
        args.solver.clone(),
        "--class".into(),
        args.class.to_string(),
        "--out".into(),
        cli_png.display().to_string(),
        "--no-progress".into(),
    ];
    let sample = Sample::try_parse_from(&argv)?;
    let t0 = Instant::now();
    ddpm_cli::sample::generate(&sample.args)?;
    let native_seconds = t0.elapsed().as_secs_f64();

    let profile = tempfile::tempdir()?;
    let browser = headless_chrome::Browser::new(headless_chrome::LaunchOptions {
        path: Some(args.chromium.clone()),
        headless: true,
        sandbox: false,
        window_size: Some((1100, 1500)),
        user_data_dir: Some(profile.path().to_path_buf()),
        idle_browser_timeout: Duration::from_secs(args.timeout + 60),
        args: CHROMIUM_ARGS.iter().map(std::ffi::OsStr::new).collect(),
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", args.chromium.display()))?;
    let tab = browser.new_tab().map_err(|e| anyhow::anyhow!("{e}"))?;
    let page = format!(
        "{}?num={}&seed={}&steps={}&solver={}&class={}&auto=1",
        server.url,
        args.num,
        args.seed,
        args.steps,
        urlencode(&args.solver),
        args.class
    );
    tab.navigate_to(&page)
        .and_then(|t| t.wait_until_navigated())
        .map_err(|e| anyhow::anyhow!("cannot open {page}: {e}"))?;
    let eval = |js: &str| -> Result<serde_json::Value> {
        let r = tab
            .evaluate(js, false)
            .map_err(|e| anyhow::anyhow!("{js}: {e}"))?;
        Ok(r.value.unwrap_or(serde_json::Value::Null))
    };
    let wait_for = |states: &[&str]| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(args.timeout);
        loop {
            let state = eval("document.body.dataset.state")?;
            let state = state.as_str().unwrap_or("").to_string();
            if states.contains(&state.as_str()) {
                return Ok(state);
            }
            if state == "error" {
                bail!(
                    "the page reports an error: {}",
                    eval("document.getElementById('error').textContent")?
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the page is still '{state}' after {} s",
                args.timeout
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    wait_for(&["done"])?;
    let screenshot = out.join("screenshot.png");
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .map_err(|e| anyhow::anyhow!("screenshot: {e}"))?;
    std::fs::write(&screenshot, png)?;
    let canvas = eval(
        "(() => { const c = document.getElementById('samples'); \
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
         return JSON.stringify({ width: c.width, height: c.height, ms: window.ddpmResult.ms, \
         data: Array.from(d) }); })()",
    )?;
    let canvas: CanvasDump = serde_json::from_str(canvas.as_str().context("canvas dump")?)?;
    let reference = image::open(&cli_png)?.to_rgba8();
    ensure!(
        (reference.width() as usize, reference.height() as usize) == (canvas.width, canvas.height),
        "the page's grid is {}x{}, ddpm-cli's {}x{}",
        canvas.width,
        canvas.height,
        reference.width(),
        reference.height()
    );
    let (mut max, mut sum, mut differing, mut count) = (0u8, 0u64, 0usize, 0usize);
    for (i, (&a, &b)) in canvas.data.iter().zip(reference.as_raw()).enumerate() {
        if i % 4 == 3 {
            ensure!(a == 255, "the canvas has a transparent pixel");
            continue;
        }
        let d = a.abs_diff(b);
        max = max.max(d);
        sum += d as u64;
        differing += (d > 0) as usize;
        count += 1;
    }
    let report = WebTestReport {
        browser_seconds: canvas.ms / 1000.0,
        native_seconds,
        max_abs_diff: max,
        mean_abs_diff: sum as f64 / count as f64,
        differing: differing as f64 / count as f64,
        wasm_bytes: site.wasm_bytes,
        screenshot,
    };
    eprintln!("{report:#?}");
    // Written before the verdict, so a failing run leaves its numbers too.
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    ensure!(
        report.max_abs_diff <= MAX_PIXEL_DIFF && report.mean_abs_diff <= MAX_MEAN_DIFF,
        "the page's samples differ from ddpm-cli's: max {} (allowed {MAX_PIXEL_DIFF}), mean {:.3} \
         (allowed {MAX_MEAN_DIFF}); see {}",
        report.max_abs_diff,
        report.mean_abs_diff,
        report.screenshot.display()
    );

    // A file that is not a checkpoint gets a message that says so, and so do weights that are
    // not safetensors.
    let bogus = out.join("not-a-checkpoint");
    std::fs::create_dir_all(&bogus)?;
    let (bad_config, bad_weights) = (bogus.join("config.json"), bogus.join("weights.safetensors"));
    std::fs::write(&bad_config, "{\"hello\": \"world\"}")?;
    std::fs::write(&bad_weights, b"these bytes are not a safetensors file")?;
    let good_config = site.dir.join("model/config.json");
    for (files, expected) in [
        ([&bad_config, &bad_weights], "not a checkpoint config.json"),
        ([&good_config, &bad_weights], "not weights for this model"),
    ] {
        tab.navigate_to(&server.url)
            .and_then(|t| t.wait_until_navigated())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        wait_for(&["ready"])?;
        let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        tab.find_element("#files")
            .and_then(|e| e.set_input_files(&paths).map(|_| ()))
            .map_err(|e| anyhow::anyhow!("cannot pick files: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let message = loop {
            if eval("document.body.dataset.state")?.as_str() == Some("error") {
                break eval("document.getElementById('error').textContent")?;
            }
            ensure!(Instant::now() < deadline, "no error shown for {paths:?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let message = message.as_str().unwrap_or("");
        ensure!(
            message.contains(expected),
            "picking {paths:?} shows {message:?}, expected a message with {expected:?}"
        );
        eprintln!("picking {paths:?}: the page says {message:?}");
    }
    Ok(report)
}

#[derive(serde::Deserialize)]
struct CanvasDump {
    width: usize,
    height: usize,
    ms: f64,
    data: Vec<u8>,
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_serves_plain_names_under_its_folder_only() {
        let d = Path::new("/site");
        assert_eq!(site_path(d, "/"), Some(d.join("index.html")));
        assert_eq!(site_path(d, "/?seed=3&auto=1"), Some(d.join("index.html")));
        assert_eq!(
            site_path(d, "/pkg/ddpm_web.js#x"),
            Some(d.join("pkg/ddpm_web.js"))
        );
        for bad in [
            "/../etc/passwd",
            "/pkg/../../x",
            "/./index.html",
            "/a\\..\\b",
            "/C:/x",
            "/pkg//x",
        ] {
            assert_eq!(site_path(d, bad), None, "{bad}");
        }
        assert_eq!(content_type(Path::new("a.wasm")), "application/wasm");
        assert!(content_type(Path::new("m.js")).starts_with("text/javascript"));
    }

    #[test]
    fn a_rebuild_replaces_only_a_folder_it_built() {
        let d = tempfile::tempdir().unwrap();
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::write(theirs.join("notes.txt"), "keep me").unwrap();
        let e = clear_site(&theirs).unwrap_err().to_string();
        assert!(e.contains("did not build"), "{e}");
        assert!(theirs.join("notes.txt").exists());
        let ours = d.path().join("ours");
        std::fs::create_dir(&ours).unwrap();
        std::fs::write(ours.join(SITE_MARKER), "").unwrap();
        std::fs::write(ours.join("index.html"), "old").unwrap();
        clear_site(&ours).unwrap();
        assert!(!ours.exists());
        clear_site(&d.path().join("new")).unwrap();
        assert!(clear_site(&theirs.join("notes.txt")).is_err());
    }
}
