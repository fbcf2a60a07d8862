//! The engine crate's error type.

/// Everything that stops the engine from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The `[tls]` files could not be loaded.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The policy file is invalid (file, line and rule named).
    #[error("policy: {0}")]
    Policy(#[from] crate::risk::file::PolicyError),
    /// The configuration is invalid; `what` names the field.
    #[error("configuration: {what}")]
    Config {
        /// What is wrong, naming the field or file.
        what: String,
    },
    /// A signer could not be built.
    #[error("account `{account}`: {source}")]
    Signer {
        /// Account name.
        account: String,
        /// Cause.
        #[source]
        source: signers::SignerError,
    },
    /// The node could not be reached or answered wrongly at start-up.
    #[error("node: {0}")]
    Venue(#[from] venues::VenueError),
    /// The pipeline failed (a stage panicked, a thread could not start).
    #[error("pipeline: {0}")]
    Pipeline(#[from] pipeline::PipelineError),
    /// The core map (`hot_core`) cannot be made on this machine.
    #[error("hot_core: {0}")]
    CoreMap(#[from] pipeline::CoreMapError),
    /// The desk listener could not be set up.
    #[error("listener on {addr}: {source}")]
    Listen {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The journal cannot be opened or recovered (a corrupt segment names its file and
    /// offset).
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    /// Recovery from the journal failed (the chain could not be asked).
    #[error("recovery: {0}")]
    Recovery(String),
    /// Other I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The dev chain process failed.
    #[error("dev chain: {0}")]
    DevChain(String),
}
