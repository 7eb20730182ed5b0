//! Workloads the privileged tests run inside their cgroups:
//!   sentinel-testkit listen ADDR COUNT    bind, print the port, accept COUNT connections
//!   sentinel-testkit connect ADDR COUNT   open and close COUNT connections

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr, count] = args.as_slice() else {
        anyhow::bail!("usage: sentinel-testkit listen|connect ADDR COUNT");
    };
    let addr: SocketAddr = addr.parse()?;
    let count: usize = count.parse()?;
    match mode.as_str() {
        "listen" => {
            let listener = TcpListener::bind(addr)?;
            println!("{}", listener.local_addr()?.port());
            std::io::stdout().flush()?;
            for _ in 0..count {
                drop(listener.accept()?);
            }
        }
        "connect" => {
            for _ in 0..count {
                drop(TcpStream::connect(addr)?);
            }
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    Ok(())
}
