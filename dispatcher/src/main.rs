mod config;
mod kernel;

use anyhow::Result;
fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())).init();
    let cfg = config::Config::parse(config::DEMO, "demo", ".".into())?;
    let k = kernel::Kernel::load(&cfg)?;
    println!("loaded; pins in {}", k.pin_dir().display());
    std::thread::sleep(std::time::Duration::from_secs(1));
    Ok(())
}
