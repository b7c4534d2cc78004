//! Tests of MetaKG on a tiny synthetic CKG: gradients against finite
//! differences (f64), the ndarray local update against candle's, determinism.

use super::*;
use crate::dataset::{IdMap, Triple};
use crate::eval::Recommender;

/// 12 users, 10 items (8 linked to KG entities, 2 not), 10 entities, 2
/// relations; two user groups liking one half of the items each.
fn tiny() -> (Dataset, Vec<Vec<u32>>) {
    let mut users = IdMap::default();
    let mut items = IdMap::default();
    let mut entities = IdMap::default();
    let mut relations = IdMap::default();
    for u in 0..12 {
        users.intern(&format!("u{u}"));
    }
    for i in 0..10 {
        items.intern(&format!("i{i}"));
    }
    for e in 0..10 {
        entities.intern(&format!("e{e}"));
    }
    relations.intern("genre");
    relations.intern("actor");
    let triples = (0..8u32)
        .map(|i| Triple {
            head: i,
            relation: i % 2,
            tail: 8 + (i / 4),
        })
        .collect();
    let item_entity = (0..10u32).map(|i| (i < 8).then_some(i)).collect();
    let order: Vec<Vec<u32>> = (0..12u32)
        .map(|u| {
            let half: Vec<u32> = if u < 6 {
                vec![0, 1, 2, 3, 8]
            } else {
                vec![4, 5, 6, 7, 9]
            };
            let mut v: Vec<u32> = half.iter().copied().filter(|i| (i + u) % 5 != 0).collect();
            v.rotate_left(u as usize % 3);
            // A few cross-group items so that every user has ≥ 8 items... not
            // needed: the tiny tasks use a small threshold below.
            v
        })
        .collect();
    let ds = Dataset {
        name: "tiny".into(),
        dir: "/nonexistent".into(),
        users,
        items,
        interactions: Vec::new(),
        rated: false,
        item_text: vec![String::new(); 10],
        entities,
        relations,
        triples,
        item_entity,
        dangling_links: 0,
        digest: "tiny".into(),
    };
    (ds, order)
}

fn tiny_cfg() -> MetaKgConfig {
    MetaKgConfig {
        dims: vec![6, 4, 3],
        rel_dim: 4,
        fanout: 3,
        inner_lr: 0.5,
        kg_batch: 16,
        meta_batch: 4,
        pairs: 3,
        score_pairs: 4,
        transr_steps: 3,
        max_steps_per_epoch: 3,
        pool: 2,
        coadapt_steps: 2,
        ..Default::default()
    }
}

/// A trainer over the tiny data, with hand-made tasks (the tiny users have
/// too few items for `build_tasks`' thresholds).
fn trainer(dtype: DType, seed: u64) -> Trainer {
    let (ds, order) = tiny();
    let cfg = tiny_cfg();
    let ckg = Ckg::build(&ds, &order, cfg.fanout, seed);
    let model = Model::new(&ckg, &cfg, dtype, seed).unwrap();
    let tasks: Vec<MetaTask> = order
        .iter()
        .enumerate()
        .map(|(u, its)| MetaTask {
            user: u as u32,
            support: its[..2].to_vec(),
            query: its[2..].to_vec(),
        })
        .collect();
    let user_items = order
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v.sort_unstable();
            v
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Trainer {
        cf_opt: adam(model.cf_vars(), cfg.outer_lr).unwrap(),
        kg_opt: adam(model.kg_vars(), cfg.kg_lr).unwrap(),
        scheduler: Scheduler::new(&mut rng),
        history: vec![[0.69, 0.0]; tasks.len()],
        ckg,
        model,
        user_items,
        n_items: 10,
        tasks,
        rng,
        consts: None,
    }
}

/// Compares autograd's gradient of `loss` w.r.t. entries of `var` with
/// central differences.
fn check_grad(var: &Var, loss: &dyn Fn() -> Tensor, entries: &[usize], tol: f64) {
    let g = loss().backward().unwrap();
    let g = g.get(var).expect("the loss depends on the variable");
    let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let base = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let shape = var.as_tensor().shape().clone();
    let eps = 1e-6;
    let mut checked = 0;
    for &e in entries {
        let e = e % base.len();
        let mut v = base.clone();
        v[e] += eps;
        var.set(&Tensor::from_vec(v.clone(), shape.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let up = loss().to_scalar::<f64>().unwrap();
        v[e] -= 2.0 * eps;
        var.set(&Tensor::from_vec(v, shape.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let down = loss().to_scalar::<f64>().unwrap();
        var.set(&Tensor::from_vec(base.clone(), shape.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let fd = (up - down) / (2.0 * eps);
        let err = (fd - g[e]).abs() / (fd.abs().max(g[e].abs()).max(1e-3));
        assert!(
            err < tol,
            "entry {e}: autograd {} vs finite difference {fd}",
            g[e]
        );
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn kg_loss_gradient_matches_finite_differences() {
    let t = trainer(DType::F64, 3);
    let triples = vec![(0, 0, 8), (4, 1, 9), (10, 4, 2), (2, 5, 12)];
    let negs = vec![9, 3, 5, 14];
    let loss = || t.model.kg_loss(&triples, &negs).unwrap();
    check_grad(&t.model.ent, &loss, &[0, 7, 13, 48, 50, 61, 80], 1e-5);
    check_grad(&t.model.wr, &loss, &[0, 5, 24, 77, 100, 130], 1e-5);
    check_grad(&t.model.rel, &loss, &[0, 3, 16, 21], 1e-5);
}

#[test]
fn meta_loss_gradient_matches_finite_differences() {
    // The query loss after the local update, differentiated through it.
    let mut t = trainer(DType::F64, 5);
    t.refresh().unwrap();
    let tasks: Vec<MetaTask> = t.tasks[..4].to_vec();
    let batch = t.batch(&tasks).unwrap();
    let consts = t.consts.as_ref().unwrap();
    let loss = || t.model.meta_loss(&t.ckg, consts, &batch).unwrap().0;
    let some: Vec<usize> = (0..24).step_by(5).collect();
    check_grad(&t.model.w1[0], &loss, &some, 1e-4);
    check_grad(&t.model.w2[0], &loss, &some, 1e-4);
    check_grad(&t.model.w1[1], &loss, &some, 1e-4);
    check_grad(&t.model.w2[1], &loss, &[0, 4, 7, 11], 1e-4);
    check_grad(&t.model.wc[0], &loss, &some, 1e-4);
    check_grad(&t.model.wk[1], &loss, &[0, 5, 10, 15], 1e-4);
    // The second-order term matters: first-order MAML would differ.
    let full = loss().backward().unwrap();
    let g2 = full
        .get(&t.model.w1[0])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(
        g2.iter().any(|g| g.abs() > 1e-9),
        "a gradient reaches the first layer"
    );
}

#[test]
fn local_update_in_ndarray_matches_candle() {
    let mut t = trainer(DType::F32, 7);
    t.refresh().unwrap();
    let consts = t.consts.as_ref().unwrap();
    let users: Vec<u32> = vec![t.ckg.user_node(0), t.ckg.user_node(7)];
    let items: Vec<u32> = (0..10).map(|i| t.ckg.item_node[i]).collect();
    let mut targets = users.clone();
    for i in &items {
        if !targets.contains(i) {
            targets.push(*i);
        }
    }
    let fwd = t.model.forward(&t.ckg, consts, &targets).unwrap();
    let star = to_array2(&fwd.star).unwrap();
    let d0 = t.model.cfg.dims[0];
    let pos = |n: u32| targets.iter().position(|&x| x == n).unwrap();
    let pairs = [(0usize, 5usize), (1, 6), (2, 4), (8, 9)];
    let steps = 3;
    let lr = 0.7;
    // candle, both users as a batch of 2
    let up = idx(&[0, 1]).unwrap();
    let e0 = fwd
        .star
        .narrow(1, 0, d0)
        .unwrap()
        .contiguous()
        .unwrap()
        .index_select(&up, 0)
        .unwrap();
    let a: Vec<Tensor> = fwd
        .a
        .iter()
        .map(|x| x.index_select(&up, 0).unwrap())
        .collect();
    let b: Vec<Tensor> = fwd
        .b
        .iter()
        .map(|x| x.index_select(&up, 0).unwrap())
        .collect();
    let pi: Vec<u32> = (0..2)
        .flat_map(|_| pairs.iter().map(|p| pos(items[p.0]) as u32))
        .collect();
    let ni: Vec<u32> = (0..2)
        .flat_map(|_| pairs.iter().map(|p| pos(items[p.1]) as u32))
        .collect();
    let dstar = star.ncols();
    let p = fwd
        .star
        .index_select(&idx(&pi).unwrap(), 0)
        .unwrap()
        .reshape((2, 4, dstar))
        .unwrap();
    let n = fwd
        .star
        .index_select(&idx(&ni).unwrap(), 0)
        .unwrap()
        .reshape((2, 4, dstar))
        .unwrap();
    let (w1, w2, _) = t
        .model
        .local_update(&e0, &a, &b, &p, &n, steps, lr)
        .unwrap();
    let candle_u = to_array2(&t.model.user_star(&e0, &a, &b, &w1, &w2).unwrap()).unwrap();
    // ndarray
    let an: Vec<Array2<f32>> = fwd.a.iter().map(|x| to_array2(x).unwrap()).collect();
    let bn: Vec<Array2<f32>> = fwd.b.iter().map(|x| to_array2(x).unwrap()).collect();
    let gw1: Vec<Array2<f32>> = t
        .model
        .w1
        .iter()
        .map(|v| to_array2(v.as_tensor()).unwrap())
        .collect();
    let gw2: Vec<Array2<f32>> = t
        .model
        .w2
        .iter()
        .map(|v| to_array2(v.as_tensor()).unwrap())
        .collect();
    let pn = star.select(
        Axis(0),
        &pairs.iter().map(|p| pos(items[p.0])).collect::<Vec<_>>(),
    );
    let nn = star.select(
        Axis(0),
        &pairs.iter().map(|p| pos(items[p.1])).collect::<Vec<_>>(),
    );
    for row in 0..2 {
        let al: Vec<Array1<f32>> = an.iter().map(|m| m.row(row).to_owned()).collect();
        let bl: Vec<Array1<f32>> = bn.iter().map(|m| m.row(row).to_owned()).collect();
        let nd = local_update_nd(
            star.row(row).slice(ndarray::s![..d0]),
            &al,
            &bl,
            &gw1,
            &gw2,
            &pn,
            &nn,
            steps,
            lr,
            t.model.cfg.slope,
        );
        let max = (&nd - &candle_u.row(row))
            .mapv(f32::abs)
            .fold(0f32, |m, &x| m.max(x));
        assert!(max < 1e-5, "user {row}: max difference {max}");
        // The update moved the representation.
        let moved = (&nd - &star.row(row))
            .mapv(f32::abs)
            .fold(0f32, |m, &x| m.max(x));
        assert!(moved > 1e-4, "user {row}: the local update changed nothing");
    }
}

#[test]
fn training_is_deterministic() {
    let run = || {
        let mut t = trainer(DType::F32, 11);
        for _ in 0..3 {
            t.kg_step(None).unwrap();
        }
        t.epoch().unwrap();
        let mut out = Array2::<f32>::zeros((3, 10));
        t.scorer(1).unwrap().score(&[0, 5, 9], out.view_mut());
        out
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert!(a.iter().all(|x| x.is_finite()));
    assert!(a.iter().any(|&x| x != 0.0));
}

#[test]
fn coadaptation_and_ablations_run() {
    for without in [
        vec![],
        vec![Component::Scheduler, Component::Local, Component::Gate],
    ] {
        let mut t = trainer(DType::F32, 2);
        t.model.cfg.without = without;
        t.epoch().unwrap();
        let tasks = vec![Task {
            user: 1,
            support: vec![0, 1],
            query: vec![2],
        }];
        t.coadapt(&tasks).unwrap();
        let mut out = Array2::<f32>::zeros((1, 10));
        t.scorer(1).unwrap().score(&[1], out.view_mut());
        assert!(out.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn tasks_hold_out_new_items_and_queries() {
    // 20 items appear in order; user 0 sees all, user 1 the first 10.
    let order = vec![(0..20u32).collect::<Vec<_>>(), (0..10u32).collect()];
    let (tasks, query_pairs) = build_tasks(&order, 20);
    // The last 4 items to appear (16..20) are new.
    let ic = tasks
        .iter()
        .find(|t| t.user == 0 && t.support.iter().all(|&i| i >= 16))
        .unwrap();
    assert!(ic.query.iter().all(|&i| i >= 16));
    assert!(ic.support.iter().all(|i| !ic.query.contains(i)));
    let uc = tasks.iter().find(|t| t.user == 1).unwrap();
    assert_eq!(uc.query, vec![5, 6, 7, 8, 9]);
    assert_eq!(uc.support, vec![0, 1, 2, 3, 4]);
    for t in &tasks {
        for &i in &t.query {
            assert!(query_pairs.binary_search(&(t.user, i)).is_ok());
        }
    }
}

#[test]
fn components_parse() {
    assert_eq!(
        "scheduler".parse::<Component>().unwrap(),
        Component::Scheduler
    );
    assert!("nope".parse::<Component>().unwrap_err().contains("coadapt"));
}
