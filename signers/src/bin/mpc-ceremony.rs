//! `mpc-ceremony --parties N --threshold T --out DIR`: the offline threshold-ECDSA key
//! ceremony (aux-info and key generation, each party in its own thread over loopback TCP).
//! Writes `DIR/party-<i>.share.json` (mode 0600) per party and prints only the public key
//! and the Ethereum address.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use signers::mpc::{CeremonyConfig, run_ceremony};

/// Threshold ECDSA (cggmp21) key ceremony.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Number of parties sharing the key (n).
    #[arg(long)]
    parties: u16,
    /// Number of parties needed to sign (t).
    #[arg(long)]
    threshold: u16,
    /// Folder for the share files (must not already hold share files).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = CeremonyConfig::new(args.parties, args.threshold, args.out);
    match run_ceremony(&cfg) {
        Ok(out) => {
            println!("public key: {}", out.public_key);
            println!("address:    {}", out.address);
            for f in &out.share_files {
                println!("share file: {}", f.display());
            }
            println!("elapsed:    {:.1} s", out.elapsed.as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mpc-ceremony: {e}");
            ExitCode::FAILURE
        }
    }
}
