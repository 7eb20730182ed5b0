//! systemd's manager on the system bus: which unit owns a cgroup, its properties, freezing,
//! and daemon-reload. Calls are made from the enforcer's and containment's threads on the
//! daemon's tokio runtime.

use std::{collections::BTreeMap, future::Future, time::Duration};

use serde::{Serialize, de::DeserializeOwned};
use tokio::runtime::Handle;
use zbus::{
    Connection,
    zvariant::{DynamicType, OwnedObjectPath, OwnedValue, Type, Value},
};

use super::properties::UnitProperty;
use crate::Error;

const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
/// D-Bus's own default reply timeout; a daemon-reload of a large system fits in it.
const CALL_TIMEOUT: Duration = Duration::from_secs(25);

/// A connection to systemd, made when first needed and made again after it broke.
pub struct SystemdBus {
    runtime: Handle,
    connection: Option<Connection>,
}

impl SystemdBus {
    pub fn new(runtime: Handle) -> Self {
        Self {
            runtime,
            connection: None,
        }
    }

    /// The unit whose own cgroup is `cgroup` (relative to the cgroup2 root); `None` when no
    /// unit owns exactly this cgroup (a delegated subtree, a container's tree).
    pub fn unit_of_cgroup(&mut self, cgroup: &str) -> Result<Option<String>, Error> {
        let cgroup = format!("/{}", cgroup.trim_matches('/'));
        let unit: OwnedObjectPath = match self.call(
            MANAGER_PATH,
            MANAGER,
            "GetUnitByControlGroup",
            &cgroup,
            &cgroup,
        ) {
            Ok(unit) => unit,
            Err(Error::Systemd { source, .. }) if is_no_such_unit(&source) => return Ok(None),
            Err(error) => return Err(error),
        };
        let id: String = self.property(&unit, "org.freedesktop.systemd1.Unit", "Id")?;
        // systemd answers with the nearest unit above a cgroup it does not own.
        let Some(interface) = unit_interface(&id) else {
            return Ok(None);
        };
        let owned: String = self.property(&unit, interface, "ControlGroup")?;
        Ok((owned == cgroup).then_some(id))
    }

    /// What `systemctl set-property --runtime UNIT ...` does.
    pub fn set_properties(
        &mut self,
        unit: &str,
        properties: &[(UnitProperty, u64)],
    ) -> Result<(), Error> {
        let values: Vec<(&str, Value<'_>)> = properties
            .iter()
            .map(|(property, value)| (property.bus_name(), Value::from(*value)))
            .collect();
        self.call::<_, ()>(
            MANAGER_PATH,
            MANAGER,
            "SetUnitProperties",
            unit,
            &(unit, true, values),
        )
    }

    /// The current values of `properties`, as `systemctl show UNIT` reports them.
    pub fn properties(
        &mut self,
        unit: &str,
        properties: impl IntoIterator<Item = UnitProperty>,
    ) -> Result<BTreeMap<UnitProperty, u64>, Error> {
        let path: OwnedObjectPath = self.call(MANAGER_PATH, MANAGER, "GetUnit", unit, &unit)?;
        let interface = unit_interface(unit)
            .ok_or_else(|| Error::InvalidArgument(format!("{unit} is not a unit with a cgroup")))?;
        properties
            .into_iter()
            .map(|property| {
                let value = self.property(&path, interface, property.bus_name())?;
                Ok((property, value))
            })
            .collect()
    }

    /// `systemctl freeze UNIT`: systemd freezes the unit's cgroup and knows it is frozen.
    pub fn freeze_unit(&mut self, unit: &str) -> Result<(), Error> {
        self.call::<_, ()>(MANAGER_PATH, MANAGER, "FreezeUnit", unit, &unit)
    }

    /// `systemctl thaw UNIT`.
    pub fn thaw_unit(&mut self, unit: &str) -> Result<(), Error> {
        self.call::<_, ()>(MANAGER_PATH, MANAGER, "ThawUnit", unit, &unit)
    }

    /// daemon-reload: systemd reads its unit files and drop-ins again and applies them to
    /// running units' cgroups. It answers once the reload is done.
    pub fn reload(&mut self) -> Result<(), Error> {
        self.call::<_, ()>(MANAGER_PATH, MANAGER, "Reload", "daemon", &())
    }

    fn property<T>(
        &mut self,
        path: &OwnedObjectPath,
        interface: &str,
        name: &str,
    ) -> Result<T, Error>
    where
        T: TryFrom<OwnedValue>,
        T::Error: Into<zbus::Error>,
    {
        let value: OwnedValue =
            self.call(path.as_str(), PROPERTIES, "Get", name, &(interface, name))?;
        T::try_from(value).map_err(|error| Error::Systemd {
            call: "Get",
            target: format!("{path} {interface}.{name}"),
            source: Box::new(error.into()),
        })
    }

    /// Calls `method` and reads its reply; `target` names what the call is about in errors.
    fn call<B, R>(
        &mut self,
        path: &str,
        interface: &str,
        method: &'static str,
        target: &str,
        body: &B,
    ) -> Result<R, Error>
    where
        B: Serialize + DynamicType,
        R: DeserializeOwned + Type,
    {
        let connection = match &self.connection {
            Some(connection) => connection.clone(),
            None => {
                let connection = self
                    .block_on("connect", Connection::system())?
                    .map_err(|error| Error::SystemdConnect(Box::new(error)))?;
                self.connection = Some(connection.clone());
                connection
            }
        };
        let reply = self.block_on(
            method,
            connection.call_method(Some(SYSTEMD), path, Some(interface), method, body),
        )?;
        let result = reply.and_then(|message| message.body().deserialize::<R>());
        if let Err(error) = &result
            && !matches!(error, zbus::Error::MethodError(..))
        {
            // Not systemd's answer: the connection itself may be broken.
            self.connection = None;
        }
        result.map_err(|source| Error::Systemd {
            call: method,
            target: target.to_string(),
            source: Box::new(source),
        })
    }

    fn block_on<T>(&self, call: &'static str, future: impl Future<Output = T>) -> Result<T, Error> {
        self.runtime
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, future).await })
            .map_err(|_| Error::SystemdTimeout {
                call,
                after: CALL_TIMEOUT,
            })
    }
}

fn is_no_such_unit(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, ..) if name.as_str() == NO_SUCH_UNIT)
}

/// The interface that holds the cgroup properties of units of this type (the name's suffix);
/// `None` for unit types without a cgroup.
fn unit_interface(unit: &str) -> Option<&'static str> {
    Some(match unit.rsplit_once('.')?.1 {
        "service" => "org.freedesktop.systemd1.Service",
        "scope" => "org.freedesktop.systemd1.Scope",
        "slice" => "org.freedesktop.systemd1.Slice",
        "socket" => "org.freedesktop.systemd1.Socket",
        "mount" => "org.freedesktop.systemd1.Mount",
        "swap" => "org.freedesktop.systemd1.Swap",
        _ => return None,
    })
}
