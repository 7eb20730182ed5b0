//! Telling the service manager that the daemon is ready (systemd's `Type=notify`).
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket named in
//! `NOTIFY_SOCKET`: a path, or an abstract name when it starts with `@`. Without the variable
//! nobody is listening, and nothing is sent.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

use tracing::warn;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Reports `READY=1`: every part is running and the metrics port is bound. A failure is only
/// logged: the daemon works the same, and systemd reports the missing notification itself.
pub fn notify_ready() {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    let Some(socket) = socket.to_str() else {
        warn!(
            ?socket,
            "{NOTIFY_SOCKET} is not UTF-8; readiness not reported"
        );
        return;
    };
    if let Err(error) = notify(socket, "READY=1") {
        warn!(socket, %error, "cannot report readiness to the service manager");
    }
}

fn notify(socket: &str, state: &str) -> io::Result<()> {
    let address = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if socket.starts_with('/') => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@...)",
            ));
        }
    };
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(state.as_bytes(), &address)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was truncated",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(listener: &UnixDatagram) -> String {
        let mut buffer = [0; 64];
        let length = listener.recv(&mut buffer).unwrap();
        String::from_utf8_lossy(&buffer[..length]).into_owned()
    }

    #[test]
    fn notifies_a_socket_given_by_path() {
        let dir = std::env::temp_dir().join(format!("sentinel-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.to_str().unwrap(), "READY=1").unwrap();
        assert_eq!(received(&listener), "READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notifies_an_abstract_socket() {
        let name = format!("sentinel-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        notify(&format!("@{name}"), "READY=1").unwrap();
        assert_eq!(received(&listener), "READY=1");
    }

    #[test]
    fn refuses_a_relative_socket_name() {
        let error = notify("notify.sock", "READY=1").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
