//! The planner: a pure function from the DAG and what has been recorded (a [`JournalView`]) to
//! the actions that move the run forward. It performs no I/O; the driver carries actions out.

use crate::dag::{Dag, InputSource};
use crate::key::step_key;
use std::collections::{BTreeMap, BTreeSet};
use tsr_state::{Digest, StepStatus};

/// What the planner may know about the recorded state.
pub trait JournalView {
    /// The step key a node of this run was bound to, if any.
    fn binding(&self, node: &str) -> Option<Digest>;
    /// The recorded status of a step key, if any (from any run in the store).
    fn status(&self, key: &Digest) -> Option<StepStatus>;
    /// The content fingerprint of an external input of a node.
    fn external(&self, node: &str, input: &str) -> Option<Digest>;
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// The step is already done (elsewhere, or under another node): bind the node to it.
    Reuse { node: String, key: Digest },
    /// Start or resume the step.
    Execute {
        node: String,
        key: Digest,
        inputs: BTreeMap<String, Digest>,
    },
    /// The node was bound to another key in an earlier session: its inputs changed.
    Conflict {
        node: String,
        recorded: Digest,
        now: Digest,
    },
}

/// A node's state as the planner sees it (for `status`).
#[derive(Clone, Debug, PartialEq)]
pub enum NodeView {
    /// Upstream not done yet.
    Waiting,
    /// Key known; executing or ready to.
    Ready(Digest),
    /// Same key already in flight under another node.
    Duplicate(Digest),
    Done(Digest, BTreeMap<String, Digest>),
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub nodes: BTreeMap<String, NodeView>,
    pub done: usize,
    pub total: usize,
}

impl Plan {
    pub fn complete(&self) -> bool {
        self.done == self.total
    }
}

/// Decide what to do next. `in_flight` are keys being executed right now (not to be started
/// twice).
pub fn plan(dag: &Dag, view: &dyn JournalView, in_flight: &BTreeSet<Digest>) -> Plan {
    let mut p = Plan {
        total: dag.len(),
        ..Default::default()
    };
    let mut outputs: BTreeMap<&str, BTreeMap<String, Digest>> = BTreeMap::new();
    let mut claimed: BTreeSet<Digest> = in_flight.clone();
    for node in dag.topo() {
        // Resolve input digests; a missing one means upstream is not done.
        let mut inputs = BTreeMap::new();
        let mut ready = true;
        for (name, src) in &node.inputs {
            let d = match src {
                InputSource::Node { node: up, output } => outputs
                    .get(up.as_str())
                    .and_then(|o| o.get(output))
                    .copied(),
                InputSource::External(_) => view.external(&node.name, name),
            };
            match d {
                Some(d) => {
                    inputs.insert(name.clone(), d);
                }
                None => ready = false,
            }
        }
        if !ready {
            p.nodes.insert(node.name.clone(), NodeView::Waiting);
            continue;
        }
        let key = step_key(
            node.step.kind(),
            node.step.version(),
            &node.step.config(),
            &inputs,
        );
        let bound = view.binding(&node.name);
        if let Some(recorded) = bound {
            if recorded != key {
                p.actions.push(Action::Conflict {
                    node: node.name.clone(),
                    recorded,
                    now: key,
                });
                p.nodes.insert(node.name.clone(), NodeView::Waiting);
                continue;
            }
        }
        match view.status(&key) {
            Some(StepStatus::Done { outputs: outs, .. }) => {
                if bound.is_none() {
                    p.actions.push(Action::Reuse {
                        node: node.name.clone(),
                        key,
                    });
                }
                p.done += 1;
                p.nodes
                    .insert(node.name.clone(), NodeView::Done(key, outs.clone()));
                outputs.insert(node.name.as_str(), outs);
            }
            _ => {
                if claimed.contains(&key) {
                    let state = if in_flight.contains(&key) && bound == Some(key) {
                        NodeView::Ready(key)
                    } else {
                        NodeView::Duplicate(key)
                    };
                    p.nodes.insert(node.name.clone(), state);
                    continue;
                }
                claimed.insert(key);
                p.actions.push(Action::Execute {
                    node: node.name.clone(),
                    key,
                    inputs,
                });
                p.nodes.insert(node.name.clone(), NodeView::Ready(key));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dag::DagBuilder;
    use crate::testkit::{ToyMap, ToySource};
    use std::sync::Arc;

    #[derive(Default)]
    struct MemView {
        bindings: BTreeMap<String, Digest>,
        statuses: BTreeMap<Digest, StepStatus>,
    }
    impl JournalView for MemView {
        fn binding(&self, node: &str) -> Option<Digest> {
            self.bindings.get(node).copied()
        }
        fn status(&self, key: &Digest) -> Option<StepStatus> {
            self.statuses.get(key).cloned()
        }
        fn external(&self, _: &str, _: &str) -> Option<Digest> {
            None
        }
    }

    fn done(out: &str) -> StepStatus {
        let mut o = BTreeMap::new();
        o.insert("data".to_string(), Digest::of(out.as_bytes()));
        StepStatus::Done {
            outputs: o,
            finished_ms: 0,
        }
    }

    fn dag() -> Dag {
        let mut b = DagBuilder::new();
        b.add("src", Arc::new(ToySource::new(4, 0, 1)), vec![], None);
        b.add(
            "m1",
            Arc::new(ToyMap::new("a", 0)),
            vec![("data", InputSource::node("src", "data"))],
            None,
        );
        b.add(
            "m2",
            Arc::new(ToyMap::new("b", 0)),
            vec![("data", InputSource::node("src", "data"))],
            None,
        );
        // Same step and same input as m1: the same key.
        b.add(
            "m1-again",
            Arc::new(ToyMap::new("a", 0)),
            vec![("data", InputSource::node("src", "data"))],
            None,
        );
        b.build().unwrap()
    }

    #[test]
    fn fresh_run_executes_sources_only() {
        let d = dag();
        let p = plan(&d, &MemView::default(), &BTreeSet::new());
        assert_eq!(p.actions.len(), 1);
        assert!(matches!(&p.actions[0], Action::Execute { node, .. } if node == "src"));
        assert_eq!(p.nodes["m1"], NodeView::Waiting);
        assert!(!p.complete());
    }

    #[test]
    fn done_source_unlocks_children_and_dedups_equal_keys() {
        let d = dag();
        let mut v = MemView::default();
        let p0 = plan(&d, &v, &BTreeSet::new());
        let Action::Execute { key: src_key, .. } = p0.actions[0].clone() else {
            panic!()
        };
        v.bindings.insert("src".into(), src_key);
        v.statuses.insert(src_key, done("src"));
        let p = plan(&d, &v, &BTreeSet::new());
        let execs: Vec<&str> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Execute { node, .. } => Some(node.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(execs, vec!["m1", "m2"]);
        assert!(matches!(p.nodes["m1-again"], NodeView::Duplicate(_)));
        assert_eq!(p.done, 1);

        // Once m1's key is done, m1-again is reused, not executed.
        let NodeView::Ready(m1_key) = p.nodes["m1"].clone() else {
            panic!()
        };
        v.bindings.insert("m1".into(), m1_key);
        v.statuses.insert(m1_key, done("m1"));
        let p = plan(&d, &v, &BTreeSet::new());
        assert!(p.actions.contains(&Action::Reuse {
            node: "m1-again".into(),
            key: m1_key
        }));
        assert_eq!(p.done, 3);
    }

    #[test]
    fn changed_inputs_conflict_with_the_recorded_binding() {
        let d = dag();
        let mut v = MemView::default();
        let p0 = plan(&d, &v, &BTreeSet::new());
        let Action::Execute { key, .. } = p0.actions[0].clone() else {
            panic!()
        };
        v.bindings
            .insert("src".into(), Digest::of(b"an older definition"));
        v.statuses.insert(key, done("src"));
        let p = plan(&d, &v, &BTreeSet::new());
        assert!(matches!(&p.actions[0], Action::Conflict { node, .. } if node == "src"));
    }

    #[test]
    fn running_or_failed_steps_are_executed_again_but_not_twice() {
        let d = dag();
        let mut v = MemView::default();
        let Action::Execute { key, .. } = plan(&d, &v, &BTreeSet::new()).actions[0].clone() else {
            panic!()
        };
        v.statuses.insert(
            key,
            StepStatus::Running {
                attempt: 1,
                since_ms: 0,
            },
        );
        assert!(matches!(
            &plan(&d, &v, &BTreeSet::new()).actions[0],
            Action::Execute { .. }
        ));
        let in_flight: BTreeSet<Digest> = [key].into_iter().collect();
        assert!(plan(&d, &v, &in_flight).actions.is_empty());
    }
}
