import type { Routes } from '../http.js';

export const workerRoutes: Routes = {};
