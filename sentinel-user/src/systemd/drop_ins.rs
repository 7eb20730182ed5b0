//! The undo of `SetUnitProperties(runtime=true)`: systemd keeps each runtime property in a
//! drop-in, `/run/systemd/system.control/UNIT.d/50-SETTING.conf`. Before Sentinel sets a
//! property it records what that file held (nothing, or the administrator's own runtime
//! `set-property`); letting go of the unit puts exactly that back, and a daemon-reload makes
//! systemd read it. Sentinel never writes `infinity` to undo a limit, and never touches a
//! drop-in of any other name or place.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::properties::UnitProperty;
use crate::Error;

/// Where systemd keeps runtime properties of the system manager's units.
pub const RUNTIME_CONTROL_DIR: &str = "/run/systemd/system.control";

/// What Sentinel changed in one unit, saved until the policy lets go of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    /// The unit's cgroup, which policies match, so that a stopped unit is released too.
    pub cgroup: String,
    /// The properties Sentinel sets, with their values.
    pub properties: Vec<(UnitProperty, u64)>,
    /// Each drop-in those properties write, with what it held before (`None`: no such file).
    pub drop_ins: BTreeMap<String, Option<String>>,
    /// Whether the unit's runtime drop-in directory existed before.
    pub directory_existed: bool,
    /// `systemctl show` values before Sentinel set anything; checked after the undo.
    pub originals: BTreeMap<UnitProperty, u64>,
}

/// The runtime drop-in directories of systemd's units.
#[derive(Debug, Clone)]
pub struct RuntimeDropIns {
    root: PathBuf,
}

impl RuntimeDropIns {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn directory(&self, unit: &str) -> Result<PathBuf, Error> {
        // A unit name is one path segment; anything else would reach outside the directory.
        if unit.is_empty() || unit.contains('/') || unit.starts_with('.') {
            return Err(Error::InvalidArgument(format!(
                "{unit:?} is not a systemd unit name"
            )));
        }
        Ok(self.root.join(format!("{unit}.d")))
    }

    /// What the drop-ins of `properties` hold now, before Sentinel sets them, and whether the
    /// unit's directory exists.
    pub fn snapshot(
        &self,
        unit: &str,
        properties: &[(UnitProperty, u64)],
    ) -> Result<(BTreeMap<String, Option<String>>, bool), Error> {
        let directory = self.directory(unit)?;
        let mut drop_ins = BTreeMap::new();
        for (property, _) in properties {
            let file = directory.join(property.drop_in());
            let content = match fs::read_to_string(&file) {
                Ok(content) => Some(content),
                Err(error) if error.kind() == ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(Error::DropIn {
                        action: "read",
                        path: file,
                        source,
                    });
                }
            };
            drop_ins.insert(property.drop_in().to_string(), content);
        }
        Ok((drop_ins, directory.is_dir()))
    }

    /// Puts back what `record` found: removes the drop-ins Sentinel created, writes back the
    /// content of those it replaced, and removes the directory if Sentinel's properties made it
    /// and nothing else is in it. systemd reads the result at its next daemon-reload.
    pub fn restore(&self, unit: &str, record: &UnitRecord) -> Result<(), Error> {
        let directory = self.directory(unit)?;
        for (name, before) in &record.drop_ins {
            let file = directory.join(name);
            let result = match before {
                Some(content) => fs::write(&file, content),
                None => match fs::remove_file(&file) {
                    Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
                    other => other,
                },
            };
            result.map_err(|source| Error::DropIn {
                action: "restore",
                path: file,
                source,
            })?;
        }
        if !record.directory_existed {
            remove_if_empty(&directory)?;
        }
        Ok(())
    }
}

fn remove_if_empty(directory: &Path) -> Result<(), Error> {
    match fs::remove_dir(directory) {
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::NotFound | ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        result => result.map_err(|source| Error::DropIn {
            action: "remove",
            path: directory.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime control directory in a temp dir.
    struct FakeControl(PathBuf);

    impl FakeControl {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("sentinel-drop-ins-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).unwrap();
            Self(root)
        }

        fn unit_dir(&self) -> PathBuf {
            self.0.join("nginx.service.d")
        }

        /// What systemd does for `SetUnitProperties(runtime=true)`.
        fn set_property(&self, property: UnitProperty, line: &str) {
            fs::create_dir_all(self.unit_dir()).unwrap();
            fs::write(self.unit_dir().join(property.drop_in()), line).unwrap();
        }

        fn files(&self) -> BTreeMap<String, String> {
            let Ok(entries) = fs::read_dir(self.unit_dir()) else {
                return BTreeMap::new();
            };
            entries
                .flatten()
                .map(|entry| {
                    let name = entry.file_name().into_string().unwrap();
                    (name, fs::read_to_string(entry.path()).unwrap())
                })
                .collect()
        }
    }

    impl Drop for FakeControl {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn record(drop_ins: BTreeMap<String, Option<String>>, directory_existed: bool) -> UnitRecord {
        UnitRecord {
            cgroup: "system.slice/nginx.service".into(),
            properties: vec![
                (UnitProperty::MemoryMax, 64 << 20),
                (UnitProperty::TasksMax, 32),
            ],
            drop_ins,
            directory_existed,
            originals: BTreeMap::new(),
        }
    }

    #[test]
    fn created_drop_ins_and_their_directory_are_removed() {
        let control = FakeControl::new("created");
        let drop_ins = RuntimeDropIns::new(control.0.clone());
        let properties = [
            (UnitProperty::MemoryMax, 64 << 20),
            (UnitProperty::TasksMax, 32),
        ];
        let (before, existed) = drop_ins.snapshot("nginx.service", &properties).unwrap();
        assert!(!existed);
        assert_eq!(
            before,
            BTreeMap::from([
                ("50-MemoryMax.conf".to_string(), None),
                ("50-TasksMax.conf".to_string(), None),
            ])
        );
        control.set_property(UnitProperty::MemoryMax, "[Service]\nMemoryMax=67108864\n");
        control.set_property(UnitProperty::TasksMax, "[Service]\nTasksMax=32\n");
        drop_ins
            .restore("nginx.service", &record(before, existed))
            .unwrap();
        assert!(!control.unit_dir().exists());
    }

    #[test]
    fn the_administrators_runtime_values_come_back_and_other_drop_ins_stay() {
        let control = FakeControl::new("admin");
        let admin_tasks = "# This is a drop-in unit file extension, created via \"systemctl \
                           set-property\" or an equivalent operation. Do not edit.\n[Service]\n\
                           TasksMax=300\n";
        control.set_property(UnitProperty::TasksMax, admin_tasks);
        control.set_property(UnitProperty::CpuWeight, "[Service]\nCPUWeight=50\n");
        let drop_ins = RuntimeDropIns::new(control.0.clone());
        let properties = [
            (UnitProperty::MemoryMax, 64 << 20),
            (UnitProperty::TasksMax, 32),
        ];
        let (before, existed) = drop_ins.snapshot("nginx.service", &properties).unwrap();
        assert!(existed);
        assert_eq!(before["50-TasksMax.conf"].as_deref(), Some(admin_tasks));
        let untouched = control.files();

        control.set_property(UnitProperty::MemoryMax, "[Service]\nMemoryMax=67108864\n");
        control.set_property(UnitProperty::TasksMax, "[Service]\nTasksMax=32\n");
        drop_ins
            .restore("nginx.service", &record(before, existed))
            .unwrap();
        assert_eq!(control.files(), untouched);
    }

    #[test]
    fn a_drop_in_already_gone_is_not_an_error() {
        let control = FakeControl::new("gone");
        let drop_ins = RuntimeDropIns::new(control.0.clone());
        let before = BTreeMap::from([("50-MemoryMax.conf".to_string(), None)]);
        drop_ins
            .restore("nginx.service", &record(before, false))
            .unwrap();
    }

    #[test]
    fn names_that_are_not_units_are_refused() {
        let control = FakeControl::new("names");
        let drop_ins = RuntimeDropIns::new(control.0.clone());
        for name in ["", "../etc", "a/b.service", ".hidden"] {
            let error = drop_ins.snapshot(name, &[]).unwrap_err();
            assert!(
                error.to_string().contains("is not a systemd unit name"),
                "{error}"
            );
        }
    }

    #[test]
    fn records_round_trip_through_json() {
        let mut saved = record(
            BTreeMap::from([(
                "50-TasksMax.conf".to_string(),
                Some("TasksMax=300\n".into()),
            )]),
            true,
        );
        saved.originals = BTreeMap::from([
            (UnitProperty::MemoryMax, u64::MAX),
            (UnitProperty::TasksMax, 300),
        ]);
        let text = serde_json::to_string(&saved).unwrap();
        assert!(
            text.contains("\"MemoryMax\":18446744073709551615"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<UnitRecord>(&text).unwrap(), saved);
    }
}
