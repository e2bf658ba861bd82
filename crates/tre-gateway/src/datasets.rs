//! The datasets one gateway serves (issue #15), each with its own engine:
//! its policy, extracts, disclosure profile and lifetime budget. A query
//! runs on the one dataset its project is approved for, or on the one it
//! names when the project covers several.

use std::collections::BTreeMap;
use std::sync::Arc;

use tre_query::Engine;
use tre_store::Project;

use crate::GatewayError;

pub struct Datasets {
    engines: BTreeMap<String, Arc<Engine>>,
    /// The dataset listed first (by name), kept apart so that a gateway
    /// can never be without one.
    first: Arc<Engine>,
}

impl Datasets {
    /// The engines, by their policies' dataset names; two engines for one
    /// dataset are refused.
    pub fn new(engines: Vec<Engine>) -> Result<Self, String> {
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
        Ok(Self {
            engines: map,
            first,
        })
    }

    /// One dataset.
    pub fn one(engine: Engine) -> Self {
        let first = Arc::new(engine);
        Self {
            engines: BTreeMap::from([(first.policy().dataset.clone(), Arc::clone(&first))]),
            first,
        }
    }

    pub fn get(&self, dataset: &str) -> Option<&Engine> {
        self.engines.get(dataset).map(AsRef::as_ref)
    }

    /// The dataset listed first (by name): what a single-dataset gateway
    /// serves.
    pub fn first(&self) -> &Engine {
        &self.first
    }

    pub fn iter(&self) -> impl Iterator<Item = &Engine> {
        self.engines.values().map(AsRef::as_ref)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.engines.keys().map(String::as_str)
    }

    /// The dataset a query of `project` runs on: the one asked for, which
    /// the project must be approved for; or, when none is asked for, the
    /// project's only dataset served here.
    pub(crate) fn for_project(
        &self,
        project: &Project,
        asked: Option<&str>,
    ) -> Result<&Arc<Engine>, GatewayError> {
        let served: Vec<&str> = project
            .datasets
            .iter()
            .map(String::as_str)
            .filter(|d| self.engines.contains_key(*d))
            .collect();
        let name = match (asked, served.as_slice()) {
            (Some(d), _) if served.contains(&d) => d,
            (Some(d), _) => {
                return Err(GatewayError::Store(
                    tre_store::StoreError::DatasetNotApproved {
                        project: project.id.to_string(),
                        dataset: d.to_owned(),
                    },
                ));
            }
            (None, [one]) => one,
            (None, []) => {
                return Err(GatewayError::Store(
                    tre_store::StoreError::DatasetNotApproved {
                        project: project.id.to_string(),
                        dataset: self.names().collect::<Vec<_>>().join(", "),
                    },
                ));
            }
            (None, several) => {
                return Err(GatewayError::BadRequest(format!(
                    "project '{}' is approved for datasets {}; name the one to query (the request's dataset, the x-tre-dataset header, or --dataset)",
                    project.id,
                    several.join(", ")
                )));
            }
        };
        self.engines
            .get(name)
            .ok_or_else(|| GatewayError::NotFound(format!("no dataset '{name}' on this server")))
    }
}
