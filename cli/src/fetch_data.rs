//! `astraea fetch-data`: the datasets that ship offline, put into the data folder.

use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct FetchDataArgs {
    /// Where to put them.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Which datasets (mnist, fashion-mnist); all when empty.
    datasets: Vec<String>,
}

/// Puts the datasets asked for (all when none) into the data folder.
pub(crate) fn fetch_data_command(args: FetchDataArgs) -> anyhow::Result<()> {
    let FetchDataArgs { data_dir, datasets } = args;
    astraea_sim::fetch_data::fetch_data(&data_dir, &datasets)
}
