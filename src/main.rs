//! The `fanout` binary: parse flags, set up logging, run the node until it has drained.

use clap::Parser;
use fanout::config::{Args, Config};

fn main() {
    let args = Args::parse();
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fanout: bad configuration: {e:#}");
            std::process::exit(2);
        }
    };
    let mut logger = env_logger::Builder::new();
    logger.filter_level(config.log_level);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        logger.parse_filters(&spec);
    }
    logger.format_timestamp_millis().init();
    if let Err(e) = fanout::server::run(config) {
        if e.downcast_ref::<fanout::server::BadConfig>().is_some() {
            log::error!("bad configuration: {e:#}");
            eprintln!("fanout: bad configuration: {e:#}");
            std::process::exit(2);
        }
        log::error!("{e:#}");
        eprintln!("fanout: {e:#}");
        std::process::exit(1);
    }
}
