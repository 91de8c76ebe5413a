//! The `fanout` binary: parse flags and the configuration file, set up logging, run the node
//! until it has drained.

use fanout::config::Config;

fn main() {
    // Exit status 2 for a bad flag, environment variable or configuration file.
    let config = Config::load(std::env::args_os()).unwrap_or_else(|e| e.exit());
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
