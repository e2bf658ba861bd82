//! The datasets one gateway serves (issue #15), each with its own engine:
//! its policy, extracts, disclosure profile and lifetime budget. A query
//! runs on the one dataset its project is approved for, or on the ones it
//! names (the request's dataset, and the datasets its SQL qualifies tables
//! with, as in `nhs_epr.patients`). Datasets that hold one person under
//! one unit may be queried together, on an engine of their own built at
//! start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tre_policy::Policy;
use tre_query::{Engine, QueryError};
use tre_store::Project;

use crate::GatewayError;

/// What a gateway serves now: its [`Datasets`], replaced whole when the
/// operator reloads them (a new opt-out list or import, issue #15). A call
/// takes the current set once and keeps it, so a query started before a
/// reload finishes on the engines it began with.
pub struct Served {
    current: std::sync::RwLock<Arc<Datasets>>,
}

impl Served {
    pub fn new(datasets: Datasets) -> Self {
        Self {
            current: std::sync::RwLock::new(Arc::new(datasets)),
        }
    }

    /// The datasets served now.
    pub fn now(&self) -> Arc<Datasets> {
        // A poisoned lock still holds a whole set: swaps never fail half
        // way.
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Serve `engines` from now on, in place of the current set, which
    /// must name the same datasets. They are admitted from the current
    /// slots, so queries on the old and the new engines together stay
    /// within the limits.
    pub fn reload(&self, mut engines: Vec<Engine>) -> Result<Arc<Datasets>, String> {
        let old = self.now();
        if let Some(first) = engines.first_mut() {
            first.share_slots(old.first());
        }
        let new = Datasets::new(engines)?;
        let (was, is): (Vec<&str>, Vec<&str>) = (old.names().collect(), new.names().collect());
        if was != is {
            return Err(format!(
                "a reload serves the same datasets ({}), not {}; restart the gateway to change them",
                was.join(", "),
                is.join(", ")
            ));
        }
        let new = Arc::new(new);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&new);
        Ok(new)
    }
}

/// The most datasets one query may join. Every combination of datasets
/// that may be joined gets an engine at start-up, so this bounds their
/// number.
pub const MAX_JOINED: usize = 3;

pub struct Datasets {
    engines: BTreeMap<String, Arc<Engine>>,
    /// The dataset listed first (by name), kept apart so that a gateway
    /// can never be without one.
    first: Arc<Engine>,
    /// An engine for each combination of datasets that may be queried
    /// together, by `Policy::joint_name`.
    joints: BTreeMap<String, Arc<Engine>>,
}

impl Datasets {
    /// The engines, by their policies' dataset names; two engines for one
    /// dataset are refused.
    pub fn new(mut engines: Vec<Engine>) -> Result<Self, String> {
        // One admission for the gateway: its limits bound all queries,
        // whatever datasets they read.
        if let Some((first, rest)) = engines.split_first_mut() {
            for e in rest {
                e.share_slots(first);
            }
        }
        let mut map = BTreeMap::new();
        for e in engines {
            let name = e.policy().dataset.clone();
            if map.insert(name.clone(), Arc::new(e)).is_some() {
                return Err(format!(
                    "dataset '{name}' is served twice; give each dataset once"
                ));
            }
        }
        let first = map
            .values()
            .next()
            .cloned()
            .ok_or_else(|| "no dataset to serve".to_owned())?;
        let joints = joints(&map.values().map(AsRef::as_ref).collect::<Vec<_>>())?;
        Ok(Self {
            engines: map,
            first,
            joints,
        })
    }

    /// One dataset.
    pub fn one(engine: Engine) -> Self {
        let first = Arc::new(engine);
        Self {
            engines: BTreeMap::from([(first.policy().dataset.clone(), Arc::clone(&first))]),
            first,
            joints: BTreeMap::new(),
        }
    }

    /// The engine of a dataset, or of datasets queried together (by their
    /// joint name, as a release's manifest names them).
    pub fn get(&self, dataset: &str) -> Option<&Engine> {
        self.engines
            .get(dataset)
            .or_else(|| self.joints.get(dataset))
            .map(AsRef::as_ref)
    }

    /// The other datasets served here that a query may join with
    /// `dataset`.
    pub fn joins_with(&self, dataset: &str) -> Vec<String> {
        self.names()
            .filter(|d| {
                *d != dataset && self.joints.contains_key(&Policy::joint_name([dataset, *d]))
            })
            .map(str::to_owned)
            .collect()
    }

    /// The engine of one dataset served here (not of datasets queried
    /// together).
    pub fn dataset(&self, name: &str) -> Option<&Engine> {
        self.engines.get(name).map(AsRef::as_ref)
    }

    /// Whether one dataset of this name is served here.
    pub fn serves(&self, name: &str) -> bool {
        self.engines.contains_key(name)
    }

    /// The engine of each dataset, shared.
    pub fn arcs(&self) -> impl Iterator<Item = &Arc<Engine>> {
        self.engines.values()
    }

    /// The names of the combinations of datasets that may be queried
    /// together here.
    pub fn joint_names(&self) -> impl Iterator<Item = &str> {
        self.joints.keys().map(String::as_str)
    }

    /// The dataset listed first (by name): what a single-dataset gateway
    /// serves.
    pub fn first(&self) -> &Engine {
        &self.first
    }

    /// The engine of each dataset.
    pub fn iter(&self) -> impl Iterator<Item = &Engine> {
        self.engines.values().map(AsRef::as_ref)
    }

    /// Every engine: each dataset's, and each for datasets queried
    /// together.
    pub fn all(&self) -> impl Iterator<Item = &Engine> {
        self.iter().chain(self.joints.values().map(AsRef::as_ref))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.engines.keys().map(String::as_str)
    }

    /// The engine a query of `project` runs on: that of the datasets it
    /// names (`asked`, which the project must be approved for, and those
    /// of its approved datasets `sql` qualifies tables with); or, when it
    /// names none, that of the project's only dataset served here.
    pub(crate) fn for_project(
        &self,
        project: &Project,
        asked: Option<&str>,
        sql: &str,
    ) -> Result<&Arc<Engine>, GatewayError> {
        let approved: Vec<&str> = project
            .datasets
            .iter()
            .map(String::as_str)
            .filter(|d| self.engines.contains_key(*d))
            .collect();
        let not_approved = |dataset: &str| {
            GatewayError::Store(tre_store::StoreError::DatasetNotApproved {
                project: project.id.to_string(),
                dataset: dataset.to_owned(),
            })
        };
        // A qualifier that names no dataset the project is approved for is
        // left to the compiler, which reports the table as unknown: served
        // or not, the answer is the same, so it cannot tell a researcher
        // which datasets this gateway holds beyond their projects'.
        let mut named: BTreeSet<String> = tre_query::datasets_named(sql)
            .into_iter()
            .filter(|d| approved.contains(&d.as_str()))
            .collect();
        if let Some(asked) = asked {
            if !approved.contains(&asked) {
                return Err(not_approved(asked));
            }
            named.insert(asked.to_owned());
        }
        let name = match (named.len(), approved.as_slice()) {
            (0, [one]) => (*one).to_owned(),
            // Without naming what is served: a researcher learns of the
            // datasets only through their projects.
            (0, []) => return Err(not_approved("any served here")),
            (0, several) => {
                return Err(GatewayError::BadRequest(format!(
                    "project '{}' is approved for datasets {}; name the one to query (qualify its tables, as in {}.<table>, or give the request's dataset, the x-tre-dataset header, or --dataset)",
                    project.id,
                    several.join(", "),
                    several.first().copied().unwrap_or_default()
                )));
            }
            (1, _) => named.into_iter().next().unwrap_or_default(),
            (n, _) if n > MAX_JOINED => {
                return Err(GatewayError::BadRequest(format!(
                    "the query names {n} datasets ({}); one query may join at most {MAX_JOINED}",
                    named.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
            (_, _) => {
                let name = Policy::joint_name(named.iter().map(String::as_str));
                if let Some(engine) = self.joints.get(&name) {
                    return Ok(engine);
                }
                // Not joinable: say why, as the policies do.
                let policies: Vec<&Policy> = named
                    .iter()
                    .filter_map(|d| self.engines.get(d))
                    .map(|e| e.policy())
                    .collect();
                return Err(match Policy::joint(&policies) {
                    Err(e) => GatewayError::Query(QueryError::Joint(e)),
                    Ok(_) => GatewayError::Query(QueryError::Internal(format!(
                        "datasets {name} may be joined but have no engine"
                    ))),
                });
            }
        };
        self.engines
            .get(&name)
            .ok_or_else(|| GatewayError::NotFound(format!("no dataset '{name}' on this server")))
    }
}

/// An engine for every combination of two to [`MAX_JOINED`] of `engines`
/// whose policies may be joined.
fn joints(engines: &[&Engine]) -> Result<BTreeMap<String, Arc<Engine>>, String> {
    let mut joints = BTreeMap::new();
    let n = engines.len();
    if n > 16 {
        return Err(format!(
            "{n} datasets are more than one gateway serves; serve at most 16"
        ));
    }
    for mask in 1u32..(1 << n) {
        let size = mask.count_ones() as usize;
        if !(2..=MAX_JOINED).contains(&size) {
            continue;
        }
        let parts: Vec<&Engine> = (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| engines[i])
            .collect();
        let policies: Vec<&Policy> = parts.iter().map(|e| e.policy()).collect();
        if Policy::joint(&policies).is_err() {
            continue;
        }
        let joint = Engine::join(&parts).map_err(|e| e.to_string())?;
        joints.insert(joint.policy().dataset.clone(), Arc::new(joint));
    }
    Ok(joints)
}
